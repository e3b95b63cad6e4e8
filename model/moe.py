"""DeepSeekMoE: dense MLP, the router, routed experts (a slice of them) and expert executors.

A MoE layer = shared experts (always run, on this process) + the routed experts each token's
router picks. Where the routed experts run is behind ``ExpertExecutor``: the default runs
this layer's own ``RoutedExperts``; an engine with remote expert shards sets its own with
``model.set_expert_executor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import DeepseekV2Config
from model.kernels import cpu_kernels
from model.linear import Linear, linear, prepack
from model.packing import apply_packed_modules_mapping, inference_layout, transpose_for_inference

# Grouped matmul (one call for many experts' row groups); forward only, no backward.
_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def _grouped_mm_supported(x: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for ``x``'s device and dtype: CPU (any float), CUDA
    in bfloat16 on sm90 and newer."""
    if _GROUPED_MM is None:
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda" and x.dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


# Half-precision routed experts run as padded batched matmuls while the rows per expert are
# few (decode: reading the weights dominates) and padding to the fullest expert costs at most
# this many times the real rows; beyond either, and in float32 (where the grouped kernel
# measured 8-14% faster), the grouped kernel (see RoutedExperts.forward).
PADDED_MAX_ROWS_PER_EXPERT = 16
PADDED_MAX_WASTE = 4
# Decode-sized batches run the C++ fused experts (model.cpu_ext) where built: each expert's
# weights streamed once for all its rows, no Python between gate/up, SiLU, down and the sum.
# Up to this many rows per expert on average; beyond, torch's GEMMs (AMX in bf16) win.
EXT_MAX_ROWS_PER_EXPERT = {torch.float32: 8.0, torch.bfloat16: 8.0}


class DeepseekV2MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers' FFN and the (merged) shared experts."""

    # gate and up read the same input: one [2*inter, D] matmul at inference (model.packing)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, ...]]] = {
        "_gate_up": ("gate_proj", "up_proj")
    }

    def __init__(self, config: DeepseekV2Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_proj = Linear(config.hidden_size, inter, bias=False)
        self.up_proj = Linear(config.hidden_size, inter, bias=False)
        self.down_proj = Linear(inter, config.hidden_size, bias=False)

        # set by ``pack_for_inference``: [2*inter, D], gate rows then up rows
        self._gate_up: Tensor | None = None
        self._gate_up_packed: Tensor | None = None  # set by ``prepack_for_inference``

    @torch.no_grad()
    def pack_for_inference(self) -> None:
        """Lay the weights out for fast inference, in place and without extra memory: gate and
        up share one matrix (one matmul instead of two). In float32 every weight is also
        stored transposed (``F.linear`` then hands BLAS a contiguous [in, out] operand, about
        twice as fast for few rows); half precision keeps the row-major layout, which its
        one-row kernels read 1.5-2x faster than the transposed one (measured on CPU).
        Parameters keep their shapes and values. Call it once the module has its final device
        and dtype (a later ``.to()`` would not move the fused matrix)."""
        apply_packed_modules_mapping(self)  # self._gate_up: [2*inter, D]
        down = inference_layout(self.down_proj.weight.detach())
        if down.data_ptr() != self.down_proj.weight.data_ptr():
            self.down_proj.weight = nn.Parameter(down, requires_grad=False)

    def prepack_for_inference(self) -> None:
        """After ``pack_for_inference``: keep oneDNN pre-packed copies of the fused gate/up
        and of down_proj (see model.linear.prepack; half precision on CPU only)."""
        if self._gate_up is None:
            raise RuntimeError("call pack_for_inference first")
        self._gate_up_packed = prepack(self._gate_up)
        self.down_proj.prepack_for_inference()

    def forward(self, x: Tensor) -> Tensor:
        if self._gate_up is not None:
            gate, up = linear(x, self._gate_up, packed=self._gate_up_packed).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- routing -------------------------------------------------------------------------------
class MoEGate(nn.Module):
    """Router: expert scores (softmax or sigmoid), then top-k by one of three methods:

    - ``greedy``: the k best scores;
    - ``group_limited_greedy`` (DeepSeek-V2): only experts of the ``topk_group`` groups with the
      best single score compete;
    - ``noaux_tc`` (DeepSeek-VL2 / V3): experts are *chosen* on the scores plus a learned
      per-expert ``e_score_correction_bias`` (the aux-loss-free balancing term), groups ranked by
      the sum of their 2 best biased scores; the chosen experts' *weights* are the unbiased
      scores, normalised when ``norm_topk_prob``, then x ``routed_scaling_factor``.

    Experts of unselected groups are filled with 0.0 (as DeepSeek's reference code does, not
    -inf): where biased scores go negative, a zeroed expert can outrank them.
    """

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # checkpoint name: model.layers.{i}.mlp.gate.e_score_correction_bias
        self.e_score_correction_bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(self.n_experts)) if self.topk_method == "noaux_tc" else None
        )

    def scores(self, x: Tensor) -> Tensor:
        """x [N, D] -> scores [N, E] float32 (router runs in float32)."""
        logits = F.linear(x.float(), self._float_weight())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def _float_weight(self) -> Tensor:
        """The weight in float32; a half-precision one cast once per weight version (not on
        every decode step) outside autograd."""
        w = self.weight
        if (
            w.dtype == torch.float32
            or (torch.is_grad_enabled() and w.requires_grad)
            or torch.compiler.is_compiling()  # a trace cannot compare data pointers
        ):
            return w.float()
        try:
            version = w._version
        except RuntimeError:  # an inference tensor: no version counter, and never updated
            version = -1
        key = (w.data_ptr(), version, w.device)
        cached = getattr(self, "_float_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, w.detach().float())
            self._float_cache = cached
        return cached[1]

    def _mask_groups(self, choice: Tensor, group_scores: Tensor) -> Tensor:
        """Zero the experts outside the ``topk_group`` best groups: choice [N, E],
        group_scores [N, G] -> [N, E]."""
        n = choice.shape[0]
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        per_group = self.n_experts // self.n_group
        expert_mask = group_mask.unsqueeze(-1).expand(n, self.n_group, per_group).reshape(n, -1)
        return choice.masked_fill(~expert_mask, 0.0)

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """scores [N, E] -> expert_ids [N, K] int64, weights [N, K] float32 (scaled)."""
        n = scores.shape[0]
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()  # [N, E]
            top2 = choice.view(n, self.n_group, -1).topk(2, dim=-1).values  # [N, G, 2]
            choice = self._mask_groups(choice, top2.sum(dim=-1))
            expert_ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, expert_ids)  # unbiased
            if self.top_k > 1 and self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return expert_ids, weights * self.routed_scaling_factor
        if self.topk_method == "group_limited_greedy":
            scores = self._mask_groups(scores, scores.view(n, self.n_group, -1).amax(dim=-1))
        weights, expert_ids = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            # DeepSeek-V2's reference code: normalised weights are not scaled further.
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return expert_ids, weights

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.select(self.scores(x))


def balance_loss(
    scores: Tensor, expert_ids: Tensor, batch: int, alpha: float, per_sequence: bool
) -> Tensor:
    """DeepSeek-V2's expert-level balance loss, alpha * sum_i f_i * P_i.

    scores [B*T, E] softmax scores (before any group masking), expert_ids [B*T, K].
    f_i = (E / (K*T)) * #tokens routed to expert i, P_i = mean score of expert i.
    per_sequence (config ``seq_aux``, as in the released models): f and P per sequence, the
    loss averaged over sequences; otherwise over all B*T tokens of the batch at once.
    """
    n_tokens, n_experts = scores.shape
    k = expert_ids.shape[-1]
    if per_sequence:
        seq = n_tokens // batch
        counts = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
        counts.scatter_add_(
            1,
            expert_ids.reshape(batch, seq * k),
            torch.ones_like(expert_ids.reshape(batch, seq * k), dtype=scores.dtype),
        )
        f = counts / (seq * k / n_experts)  # [B, E]
        p = scores.view(batch, seq, n_experts).mean(dim=1)  # [B, E]
        return (f * p).sum(dim=1).mean() * alpha
    counts = torch.zeros(n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(
        0, expert_ids.reshape(-1), torch.ones_like(expert_ids.reshape(-1), dtype=scores.dtype)
    )
    f = counts / (n_tokens * k) * n_experts
    return (f * scores.mean(dim=0)).sum() * alpha


# ---- routed experts --------------------------------------------------------------------------
class RoutedExperts(nn.Module):
    """Routed experts [start, end) of one MoE layer, stacked for speed.

    ``gate_up[e]`` holds expert ``start+e``'s gate_proj rows then its up_proj rows; ``down[e]``
    its down_proj. state_dict() / load_state_dict() use the published per-expert names
    (``{i}.gate_proj.weight`` ... with global expert ids), so checkpoints round-trip.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start <= end:
            raise ValueError(f"bad expert slice [{start}, {end})")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.start, self.end = start, end
        n = end - start
        self.gate_up = nn.Parameter(torch.empty(n, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(n, hidden_size, intermediate_size))
        # force inference without host syncs on the CPU too (see ``_use_sync_free``)
        self.sync_free = False

    @property
    def num_experts(self) -> int:
        return self.end - self.start

    def extra_repr(self) -> str:
        return (
            f"experts=[{self.start}, {self.end}), hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}"
        )

    def expert_tensors(self, local: int) -> dict[str, Tensor]:
        """Views of local expert ``local``'s three weights under their published names."""
        inter = self.intermediate_size
        return {
            "gate_proj.weight": self.gate_up[local, :inter],
            "up_proj.weight": self.gate_up[local, inter:],
            "down_proj.weight": self.down[local],
        }

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        for local in range(self.num_experts):
            for name, t in self.expert_tensors(local).items():
                destination[f"{prefix}{self.start + local}.{name}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        expected = set()
        with torch.no_grad():
            for local in range(self.num_experts):
                for name, target in self.expert_tensors(local).items():
                    key = f"{prefix}{self.start + local}.{name}"
                    expected.add(key)
                    if key not in state_dict:
                        missing_keys.append(key)
                    elif state_dict[key].shape != target.shape:
                        error_msgs.append(
                            f"size mismatch for {key}: checkpoint has {tuple(state_dict[key].shape)}, "
                            f"expected {tuple(target.shape)}"
                        )
                    else:
                        target.copy_(state_dict[key])
        if strict:
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in expected
            )

    @torch.no_grad()
    def pack_for_inference(self) -> None:
        """In float32, store each expert's weights transposed ([in, out] contiguous), in place:
        the grouped matmul then reads them as plain row-major operands. Shapes and values are
        unchanged (``gate_up`` stays [n, 2*inter, D], only its strides differ). Half precision
        keeps the published row-major layout (see ``transpose_for_inference``)."""
        if not transpose_for_inference(self.gate_up.dtype):
            return
        self.gate_up = nn.Parameter(
            self.gate_up.transpose(1, 2).contiguous().transpose(1, 2), requires_grad=False
        )
        self.down = nn.Parameter(
            self.down.transpose(1, 2).contiguous().transpose(1, 2), requires_grad=False
        )

    def _forward_one_row(self, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """The single-row case (one decoding sequence): its K experts one after another, no
        sorting or scatter. Accumulates in float32 like the general path."""
        acc: Tensor | None = None
        for e, w in zip(expert_ids[0].tolist(), weights[0].tolist(), strict=True):
            e -= self.start
            if not 0 <= e < self.num_experts:
                continue
            gate, up = linear(hidden, self.gate_up[e]).chunk(2, dim=-1)
            y = linear(F.silu(gate).mul_(up), self.down[e]).float()  # [1, D]
            acc = y.mul_(w) if acc is None else acc.add_(y, alpha=w)
        if acc is None:
            return hidden.new_zeros(1, self.hidden_size)
        return acc.to(hidden.dtype)

    def _loop(self, x: Tensor, counts: list[int]) -> Tensor:
        """x [M, D] grouped by local expert (counts[e] rows each) -> [M, D], one expert at a
        time; only experts that got rows do work. The path with a backward (training)."""
        pieces = []
        begin = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            gate, up = F.linear(x[begin : begin + c], self.gate_up[e]).chunk(2, dim=-1)
            pieces.append(F.linear(F.silu(gate) * up, self.down[e]))  # [c, D]
            begin += c
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _padded(self, x: Tensor, counts: Tensor, ends: Tensor, cap: int) -> Tensor:
        """x [M, D] grouped by local expert -> [M, D] with two batched matmuls over every local
        expert, each group padded to `cap` rows. A half-precision decode step is bound by
        reading the expert weights, and bf16 bmm streams them faster than the grouped kernel
        (whole engine at 32 decoding sequences: +20-24% tokens/s measured); the padded rows
        cost compute only. The weights are the left operand (W @ x^T, as in model.linear):
        another +14-27% at 32 sequences, measured."""
        n_local, d = counts.shape[0], x.shape[1]
        expert_of = torch.repeat_interleave(torch.arange(n_local, device=x.device), counts)  # [M]
        rank = torch.arange(x.shape[0], device=x.device) - (ends - counts).index_select(
            0, expert_of
        )
        slot = expert_of * cap + rank  # [M] row of each assignment in the padded batch
        padded = x.new_zeros(n_local * cap, d).index_copy_(0, slot, x)
        gate_up = torch.bmm(self.gate_up, padded.view(n_local, cap, d).transpose(1, 2))
        gate, up = gate_up.chunk(2, dim=1)  # [E, I, cap] each
        y = torch.bmm(self.down, F.silu(gate).mul_(up))  # [E, D, cap]
        return y.transpose(1, 2)[expert_of, rank]  # [M, D]: each assignment's row

    def _use_sync_free(self, hidden: Tensor) -> bool:
        """Off the CPU: where the grouped matmul runs (no host sync costs nothing then), and
        always while a CUDA graph is being captured (its padded form: every expert over all
        rows, affordable for decode-sized batches only). On the CPU: when ``sync_free`` is
        set (tests of that path)."""
        if self.sync_free:
            return True
        if hidden.device.type == "cpu":
            return False
        if _grouped_mm_supported(hidden):
            return True
        return hidden.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _use_ext(self, hidden: Tensor, n_assignments: int) -> bool:
        """Whether the C++ fused experts take this batch (see EXT_MAX_ROWS_PER_EXPERT)."""
        limit = EXT_MAX_ROWS_PER_EXPERT.get(self.gate_up.dtype)
        return (
            limit is not None
            and n_assignments <= limit * self.num_experts
            and cpu_kernels().ext_ops is not None
            and hidden.device.type == "cpu"
            and hidden.dtype == self.gate_up.dtype
            and self.gate_up.stride(-1) == 1
            and self.down.stride(-1) == 1
            and not torch.compiler.is_compiling()
        )

    def _sync_free(self, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """The same sum with no host sync and shapes fixed by N and K alone, so a CUDA graph
        can capture it (and an accelerator never stalls on a host read). Every one of the
        N*K assignments is computed; those outside this slice go to local expert 0 with
        weight 0. Grouped matmul over the assignments sorted by expert where the device has
        one (CUDA bf16 on sm90+, CPU); otherwise each expert over all N rows, padded (the
        choices of a row are distinct, so an expert gets each row at most once)."""
        n_rows, k = expert_ids.shape
        n_local, d = self.num_experts, hidden.shape[1]
        local = expert_ids - self.start  # [N, K]
        inside = (local >= 0) & (local < n_local)
        local = torch.where(inside, local, 0).reshape(-1)  # [N*K]
        w = torch.where(inside, weights, 0.0).reshape(-1)  # [N*K] float32
        rows = torch.arange(n_rows, device=hidden.device)[:, None].expand(n_rows, k).reshape(-1)
        if _grouped_mm_supported(hidden):
            order = torch.argsort(local, stable=True)
            counts = torch.zeros(n_local, dtype=torch.int32, device=hidden.device)
            counts.scatter_add_(0, local, torch.ones_like(local, dtype=torch.int32))
            offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each group
            x = hidden.index_select(0, rows.index_select(0, order))  # [N*K, D] by expert
            gate, up = _GROUPED_MM(x, self.gate_up.transpose(1, 2), offs=offs).chunk(2, -1)
            y = _GROUPED_MM(F.silu(gate).mul_(up), self.down.transpose(1, 2), offs=offs)
            y = y * w.index_select(0, order).unsqueeze(-1)  # [N*K, D]
            rows = rows.index_select(0, order)
        else:
            slot = local * n_rows + rows  # [N*K]: row n of expert e's padded group
            padded = hidden.new_zeros(n_local * n_rows, d).index_copy_(0, slot, hidden[rows])
            gate_up = torch.bmm(self.gate_up, padded.view(n_local, n_rows, d).transpose(1, 2))
            gate, up = gate_up.chunk(2, dim=1)  # [E, I, N] each
            y = torch.bmm(self.down, F.silu(gate).mul_(up)).transpose(1, 2)  # [E, N, D]
            y = y.reshape(-1, d).index_select(0, slot) * w.unsqueeze(-1)  # [N*K, D]
        out = hidden.new_zeros(n_rows, d)
        return out.index_add_(0, rows, y.to(out.dtype))

    def forward(self, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """hidden [N, D], expert_ids [N, K], weights [N, K] -> [N, D]: the weighted sum over the
        K choices that fall in [start, end); the others contribute nothing."""
        n_rows, k = expert_ids.shape
        n_local = self.num_experts
        if n_local == 0:
            return hidden.new_zeros(n_rows, self.hidden_size)
        training = torch.is_grad_enabled() and (self.gate_up.requires_grad or hidden.requires_grad)
        if not training and self._use_sync_free(hidden):
            return self._sync_free(hidden, expert_ids, weights)
        if not training and self._use_ext(hidden, n_rows * k):
            ext = cpu_kernels().ext_ops
            return ext.moe(hidden, expert_ids, weights, self.gate_up, self.down, self.start)
        if n_rows == 1 and not (torch.is_grad_enabled() and self.gate_up.requires_grad):
            return self._forward_one_row(hidden, expert_ids, weights)
        # Sort the N*K (row, choice) assignments by local expert; foreign ones sort last.
        local = (expert_ids - self.start).reshape(-1)
        local = torch.where((local >= 0) & (local < n_local), local, n_local)
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=n_local + 1)
        out = hidden.new_zeros(n_rows, self.hidden_size)
        inference = not (
            torch.is_grad_enabled() and (self.gate_up.requires_grad or hidden.requires_grad)
        )
        # Batched kernels pay for themselves once there are about as many assignments as
        # experts (8+ decode rows of top-4 over 32 experts); fewer run the loop below. The
        # grouped kernel has no CPU backward, and training keeps to one path (the loop) so a
        # seeded run gives the same weights whatever the batch shapes.
        batched = inference and n_rows * k >= n_local and hidden.device.type == "cpu"
        if batched:
            ends = counts[:n_local].cumsum(0)  # [E] end row of each expert's group
            n_assigned, cap = torch.stack([ends[-1], counts[:n_local].max()]).tolist()
            if n_assigned == 0:
                return out
            order = order[:n_assigned]
            rows = order // k  # [M] token row of each assignment, grouped by expert
            x = hidden.index_select(0, rows)  # [M, D]
            if (
                x.dtype in (torch.bfloat16, torch.float16)
                and n_assigned <= PADDED_MAX_ROWS_PER_EXPERT * n_local
                and cap * n_local <= PADDED_MAX_WASTE * n_assigned
            ):
                y = self._padded(x, counts[:n_local], ends, cap)
            elif _GROUPED_MM is not None:
                # One grouped matmul per projection (C++ loops over the groups): compute-bound
                # prefill, where padding every expert to the fullest one would waste work.
                offs = ends.to(torch.int32)
                gate, up = _GROUPED_MM(x, self.gate_up.transpose(1, 2), offs=offs).chunk(2, -1)
                y = _GROUPED_MM(F.silu(gate).mul_(up), self.down.transpose(1, 2), offs=offs)
            else:
                y = self._loop(x, counts[:n_local].tolist())
        else:
            counts_l = counts.tolist()  # one host sync
            n_assigned = n_rows * k - counts_l[n_local]
            if n_assigned == 0:
                return out
            order = order[:n_assigned]
            rows = order // k
            x = hidden.index_select(0, rows)  # [M, D]
            y = self._loop(x, counts_l[:n_local])
        y = y * weights.reshape(-1).index_select(0, order).unsqueeze(-1)  # float32 weights
        return out.index_add_(0, rows, y.to(out.dtype))


# ---- executors -------------------------------------------------------------------------------
@runtime_checkable
class PendingExperts(Protocol):
    def wait(self) -> Tensor: ...  # [T, D] weighted sum of routed experts


@runtime_checkable
class ExpertExecutor(Protocol):
    def start(
        self, layer_idx: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor
    ) -> PendingExperts: ...


class CompletedExperts:
    """A PendingExperts whose result is already there."""

    def __init__(self, result: Tensor) -> None:
        self.result = result

    def wait(self) -> Tensor:
        return self.result


class LocalExpertExecutor:
    """Runs routed experts in this process. ``experts[layer_idx]`` is one RoutedExperts or a
    list of slices whose partial sums add up (e.g. what several shards would hold)."""

    def __init__(self, experts: Mapping[int, RoutedExperts | list[RoutedExperts]]) -> None:
        self.experts = {
            i: list(e) if isinstance(e, list | tuple) else [e] for i, e in experts.items()
        }

    def start(
        self, layer_idx: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor
    ) -> PendingExperts:
        slices = self.experts.get(layer_idx)
        if not slices:
            raise KeyError(f"no routed experts held for layer {layer_idx}")
        out = slices[0](hidden, expert_ids, weights)
        for s in slices[1:]:
            out = out + s(hidden, expert_ids, weights)
        return CompletedExperts(out)


class _OwnExperts:
    """Default executor of a MoE layer: its own RoutedExperts, called directly."""

    def __init__(self, experts: RoutedExperts) -> None:
        self.experts = experts

    def start(
        self, layer_idx: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor
    ) -> PendingExperts:
        return CompletedExperts(self.experts(hidden, expert_ids, weights))


class DeepseekV2MoE(nn.Module):
    """Shared experts + routed experts. ``experts`` is None when built without routed experts
    (``experts="none"``); then an executor must be set before a forward pass."""

    def __init__(
        self,
        config: DeepseekV2Config,
        layer_idx: int,
        expert_slice: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.gate = MoEGate(config)
        if expert_slice is None:
            self.experts = None
        else:
            self.experts = RoutedExperts(
                config.hidden_size, config.moe_intermediate_size, *expert_slice
            )
        self.shared_experts = (
            DeepseekV2MLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self._executor: ExpertExecutor | None = None

    @property
    def executor(self) -> ExpertExecutor:
        if self._executor is not None:
            return self._executor
        if self.experts is None:
            raise RuntimeError(
                f"MoE layer {self.layer_idx} holds no routed experts (loaded with experts='none'); "
                "set one with model.set_expert_executor(executor)"
            )
        return _OwnExperts(self.experts)

    @executor.setter
    def executor(self, executor: ExpertExecutor | None) -> None:
        self._executor = executor

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, D] -> expert_ids [T, K] int64, weights [T, K] float32 (× routed_scaling_factor)."""
        return self.gate(x)

    def forward(self, x: Tensor, with_balance_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x [..., D] -> [..., D]; with_balance_loss: also the balance loss (x must be [B, T, D])."""
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        scores = self.gate.scores(flat)
        expert_ids, weights = self.gate.select(scores)
        pending = self.executor.start(self.layer_idx, flat, expert_ids, weights)
        # Shared experts run while a remote executor's shards work on the routed part.
        shared = self.shared_experts(flat) if self.shared_experts is not None else None
        out = pending.wait()
        if shared is not None:
            out = out + shared
        out = out.view(x.shape)
        if not with_balance_loss:
            return out
        batch = x.shape[0] if x.dim() == 3 else 1
        loss = balance_loss(
            scores, expert_ids, batch, self.config.aux_loss_alpha, self.config.seq_aux
        )
        return out, loss
