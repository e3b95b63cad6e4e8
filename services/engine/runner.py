"""One forward step over the packed tokens of every scheduled sequence.

Tokens of all sequences are packed into one [T, D] batch (single-token steps first, then
prefill chunks). Per layer: `project` -> write `cat(latent, k_pe)` into the paged cache at
each token's slot -> attention -> MLP/MoE over all T rows at once.

Attention has two paths:
- single-token rows (decode) use the absorbed form: MQA over the gathered 576-wide cache
  vectors of each sequence (padded to the longest context in the step, masked);
- prefill chunks decompress K/V from the sequence's cached latents and run fused attention
  (prior context unmasked + the chunk causally, merged by log-sum-exp), so memory per chunk
  is linear in the context length.
Only the rows that sample a token go through the final norm and lm_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.linear import linear, prepack
from model.moe import DeepseekV2MLP, DeepseekV2MoE, transpose_for_inference
from model.rope import apply_rotary
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence

# Fused CPU attention that also returns the log-sum-exp (public SDPA does not).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _pack_linear(linear: nn.Linear) -> None:
    """In float32, store a weight transposed ([in, out] contiguous; same shape and values):
    F.linear then passes BLAS a row-major operand, about twice as fast for the few rows of a
    decode step. Half-precision weights stay row-major (faster there)."""
    w = linear.weight
    if not transpose_for_inference(w.dtype):
        return
    if w.dim() == 2 and not (w.stride(0) == 1 and w.stride(1) == w.shape[0]):
        linear.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)


class _LayerWeights:
    """Per-layer weights laid out for the decode path, prepared once."""

    def __init__(self, attn: nn.Module) -> None:
        h, dn, r = attn.num_heads, attn.qk_nope_head_dim, attn.kv_lora_rank
        first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        kv_a = attn.kv_a_proj_with_mqa
        self.n_first = first.weight.shape[0]
        # q (or q_a) and kv_a read the same input: one [D, nq + r + dr] matmul. The two
        # modules keep working: their weights become views of the fused matrix (no copy).
        self.qkv: Tensor | None = None
        if first.bias is None and kv_a.bias is None:
            fused = torch.cat([first.weight, kv_a.weight])  # [nq + r + dr, D]
            if transpose_for_inference(fused.dtype):
                fused = fused.t().contiguous().t()  # column-major storage, same values
            first.weight = nn.Parameter(fused[: self.n_first], requires_grad=False)
            kv_a.weight = nn.Parameter(fused[self.n_first :], requires_grad=False)
            self.qkv = fused  # [nq + r + dr, D]
        self.qkv_packed: Tensor | None = None  # set by ModelRunner._prepack_decode_weights
        w = attn.kv_b_proj.weight.detach().reshape(h, -1, r)  # [H, dn + dv, r]
        self.w_uk = w[:, :dn].contiguous()  # [H, dn, r]: q_nope -> q_latent
        self.w_uv_t = w[:, dn:].transpose(1, 2).contiguous()  # [H, r, dv]: latent -> v


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        prepack: bool = True,
    ):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layers = list(model.model.layers)
        attn0 = self.layers[0].self_attn
        self.rotary = attn0.rotary
        self.r = cfg.kv_lora_rank
        self.dr = cfg.qk_rope_head_dim
        self.width = self.r + self.dr
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else device
        # [layers, slots, r + dr]: one preallocated tensor for the whole paged cache
        self.cache = torch.zeros(
            len(self.layers), num_blocks * block_size, self.width, dtype=dtype, device=self.device
        )
        self._prepare_weights()
        if prepack:
            self._prepack_decode_weights()

    @torch.no_grad()
    def _prepare_weights(self) -> None:
        """Re-lay the model's weights for inference (values unchanged, no extra copies except
        the small absorbed W_UK / W_UV): fused q + kv_a projection, fused gate + up,
        transposed storage, experts stored for the grouped matmul."""
        m = self.model
        self.layer_weights = [_LayerWeights(layer.self_attn) for layer in self.layers]
        for layer in self.layers:
            mlp = layer.mlp
            if isinstance(mlp, DeepseekV2MoE):
                if mlp.shared_experts is not None:
                    mlp.shared_experts.pack_for_inference()
                if mlp.experts is not None:
                    mlp.experts.pack_for_inference()
            elif isinstance(mlp, DeepseekV2MLP):
                mlp.pack_for_inference()
        tied = m.lm_head.weight is m.model.embed_tokens.weight
        for mod in m.modules():
            # a tied lm_head keeps the embedding's row-major layout (row lookups)
            if isinstance(mod, nn.Linear) and not (tied and mod is m.lm_head):
                _pack_linear(mod)

    @torch.no_grad()
    def _prepack_decode_weights(self) -> None:
        """Half precision on CPU (a no-op otherwise): oneDNN pre-packed copies of the weights
        every decode step reads besides the routed experts, so batched decode GEMMs skip
        re-laying them out on each call (model.linear.prepack; a second copy of these weights).
        The routed experts, most of a MoE model's bytes, are not copied."""
        for layer, lw in zip(self.layers, self.layer_weights, strict=True):
            attn = layer.self_attn
            if lw.qkv is not None:
                lw.qkv_packed = prepack(lw.qkv)
            else:
                (attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj).prepack_for_inference()
                attn.kv_a_proj_with_mqa.prepack_for_inference()
            if attn.q_lora_rank is not None:
                attn.q_b_proj.prepack_for_inference()
            attn.o_proj.prepack_for_inference()
            mlp = layer.mlp.shared_experts if isinstance(layer.mlp, DeepseekV2MoE) else layer.mlp
            if mlp is not None:
                mlp.prepack_for_inference()
        self.model.lm_head.prepack_for_inference()

    def logits(self, h: Tensor) -> Tensor:
        """Final norm + lm_head for the rows that sample: h [N, D] -> [N, V] in the model's
        dtype. Not cast to float32 here: greedy rows take the max as is (widening is exact,
        so the same index), and the sampler widens only the rows it samples."""
        m = self.model
        return m.lm_head(m.model.norm(h))

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * width * torch.empty((), dtype=dtype).element_size()

    # -- step inputs ------------------------------------------------------------------------
    def _slots(self, table: list[int], start: int, end: int) -> Tensor:
        """Cache slots of positions [start, end) of a sequence with block table `table`."""
        bs = self.block_size
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)
        return blocks[pos // bs] * bs + pos % bs

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], Tensor | None]:
        """Run the step; returns the sequences that sample and their logits [N, V]."""
        bs = self.block_size
        decodes = batch.decodes
        prefills = batch.prefills

        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in decodes:
            p = s.num_computed
            tokens.append(s.token_ids[p])
            positions.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
        tok_t = [torch.tensor(tokens, dtype=torch.long)]
        pos_t = [torch.tensor(positions, dtype=torch.long)]
        slot_t = [torch.tensor(slots, dtype=torch.long)]
        prefill_ctx: list[tuple[int, int, int, Tensor]] = []  # (row, chunk, context, blocks)
        row = len(decodes)
        # a single-token chunk may be the middle of a prompt (budget ran out): no sample then
        sample_rows = [i for i, s in enumerate(decodes) if s.num_computed + 1 == len(s.token_ids)]
        samplers = [decodes[i] for i in sample_rows]
        for s, n in prefills:
            start, end = s.num_computed, s.num_computed + n
            tok_t.append(torch.tensor(s.token_ids[start:end], dtype=torch.long))
            pos_t.append(torch.arange(start, end))
            slot_t.append(self._slots(s.block_table, start, end))
            ctx_blocks = torch.tensor(s.block_table[: -(-end // bs)], dtype=torch.long)
            prefill_ctx.append((row, n, end, ctx_blocks))
            row += n
            if end == len(s.token_ids):
                sample_rows.append(row - 1)
                samplers.append(s)
        input_ids = torch.cat(tok_t) if prefills else tok_t[0]
        pos = torch.cat(pos_t) if prefills else pos_t[0]
        slot_mapping = torch.cat(slot_t) if prefills else slot_t[0]

        # decode context: whole blocks of each decoding sequence, gathered in one index_select
        # (block-sized copies); positions past a sequence's length are masked out
        dec_blocks = dec_bias = None
        if decodes:
            lens = [s.num_computed + 1 for s in decodes]
            lmax = max(lens)
            nb = -(-lmax // bs)
            dec_blocks = torch.tensor(
                [s.block_table[:nb] + [0] * (nb - min(nb, len(s.block_table))) for s in decodes],
                dtype=torch.long,
            ).view(-1)  # [B * nb]
            if min(lens) != nb * bs:
                valid = torch.arange(nb * bs)[None, :] < torch.tensor(lens)[:, None]  # [B, L]
                dec_bias = torch.zeros(len(lens), 1, nb * bs, dtype=self.dtype)
                dec_bias.masked_fill_(~valid[:, None, :], float("-inf"))

        if not prefills:
            h = self.decode_forward(input_ids, pos, slot_mapping, dec_blocks, dec_bias, sample_rows)
        else:
            h = self.forward(
                input_ids,
                pos,
                slot_mapping,
                len(decodes),
                dec_blocks,
                dec_bias,
                prefill_ctx,
                sample_rows,
            )
        return samplers, h

    # -- the forward pass -------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        slot_mapping: Tensor,
        num_decodes: int,
        dec_blocks: Tensor | None,
        dec_bias: Tensor | None,
        prefill_ctx: list[tuple[int, int, int, Tensor]],
        sample_rows: list[int],
    ) -> Tensor | None:
        m = self.model
        h = m.model.embed_tokens(input_ids)  # [T, D]
        rope = self.rotary.cos_sin(positions)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            attn = layer.self_attn
            q_nope, q_pe, latent, k_pe = attn.project(x, positions, rope)
            cache = self.cache[li]  # [slots, r + dr]
            cache.index_copy_(0, slot_mapping, torch.cat([latent, k_pe], dim=-1).to(cache.dtype))
            outs: list[Tensor] = []
            if num_decodes:
                outs.append(
                    self._decode_attention(
                        attn, cache, q_nope[:num_decodes], q_pe[:num_decodes], dec_blocks, dec_bias
                    )
                )
            for row, n, ctx_len, ctx in prefill_ctx:
                outs.append(
                    self._prefill_attention(
                        attn, cache, q_nope[row : row + n], q_pe[row : row + n], ctx_len, ctx
                    )
                )
            h = h + (outs[0] if len(outs) == 1 else torch.cat(outs))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if not sample_rows:
            return None
        if len(sample_rows) != h.shape[0]:
            h = h[torch.tensor(sample_rows, dtype=torch.long)]
        return self.logits(h)  # [N, V]

    @torch.inference_mode()
    def decode_forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        slot_mapping: Tensor,
        blocks: Tensor,
        bias: Tensor | None,
        sample_rows: list[int],
    ) -> Tensor | None:
        """Decode-only steps (the common case): the same math as `forward` with fewer ops.

        Small models spend a decode step on per-op overhead, so this path skips the
        general-purpose primitives where a fused form exists: RoPE tables looked up once for
        all layers, W_UK / W_UV applied as one bmm over heads, no per-call reshapes.
        """
        m = self.model
        b = input_ids.shape[0]
        h = m.model.embed_tokens(input_ids)  # [B, D]
        rot = self.rotary.lookup(positions)  # [B, dr/2] complex, once for all layers
        rot_q = rot.unsqueeze(-2)  # broadcast over heads
        r, width = self.r, self.width
        for layer, lw, cache in zip(self.layers, self.layer_weights, self.cache, strict=True):
            attn = layer.self_attn
            heads, dn = attn.num_heads, attn.qk_nope_head_dim
            x = layer.input_layernorm(h)
            if lw.qkv is not None:
                y = linear(x, lw.qkv, packed=lw.qkv_packed)  # [B, nq + r + dr]: q/q_a + kv_a
                q, kv = y[:, : lw.n_first], y[:, lw.n_first :]
            else:
                q = (attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj)(x)
                kv = attn.kv_a_proj_with_mqa(x)  # [B, r + dr]
            if attn.q_lora_rank is not None:
                q = attn.q_b_proj(attn.q_a_layernorm(q))
            q = q.view(b, heads, -1)  # [B, H, dn + dr]
            entry = torch.cat([attn.kv_a_layernorm(kv[:, :r]), apply_rotary(kv[:, r:], rot)], -1)
            cache.index_copy_(0, slot_mapping, entry.to(cache.dtype))
            q_latent = torch.bmm(q[:, :, :dn].transpose(0, 1), lw.w_uk)  # [H, B, r]
            qc = torch.cat([q_latent.transpose(0, 1), apply_rotary(q[:, :, dn:], rot_q)], dim=-1)
            paged = cache.view(self.num_blocks, self.block_size, width)
            kvc = paged.index_select(0, blocks).view(b, -1, width)  # [B, L, r + dr]
            if bias is None:
                scores = torch.bmm(qc, kvc.transpose(1, 2)).mul_(attn.softmax_scale)
            else:  # [B, H, L] = bias + scale * q·k, one op
                scores = torch.baddbmm(bias, qc, kvc.transpose(1, 2), alpha=attn.softmax_scale)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kvc.dtype)
            o_latent = torch.bmm(probs, kvc[:, :, :r])  # [B, H, r]
            o = torch.bmm(o_latent.transpose(0, 1), lw.w_uv_t)  # [H, B, dv]
            h = h + attn.o_proj(o.transpose(0, 1).reshape(b, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if not sample_rows:
            return None
        if len(sample_rows) != b:
            h = h[torch.tensor(sample_rows, dtype=torch.long)]
        return self.logits(h)  # [N, V]

    def _decode_attention(
        self,
        attn: nn.Module,
        cache: Tensor,
        q_nope: Tensor,
        q_pe: Tensor,
        blocks: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        """Absorbed MLA for one new token per sequence: MQA over the latent cache."""
        b = q_nope.shape[0]
        paged = cache.view(self.num_blocks, self.block_size, self.width)
        kv = paged.index_select(0, blocks).view(b, -1, self.width)  # [B, L, r + dr]
        q = torch.cat([attn.absorb_query(q_nope), q_pe], dim=-1)  # [B, H, r + dr]
        scores = torch.bmm(q, kv.transpose(1, 2))  # [B, H, L]
        if bias is not None:
            scores = scores.mul_(attn.softmax_scale).add_(bias)
        else:
            scores = scores.mul_(attn.softmax_scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype)
        o_latent = torch.bmm(probs, kv[:, :, : self.r])  # [B, H, r]
        return attn.latent_to_output(o_latent)  # [B, D]

    def _prefill_attention(
        self,
        attn: nn.Module,
        cache: Tensor,
        q_nope: Tensor,
        q_pe: Tensor,
        ctx_len: int,
        ctx: Tensor,
    ) -> Tensor:
        """Decompressed MLA for a chunk of n tokens over its sequence's whole context."""
        n = q_nope.shape[0]
        paged = cache.view(self.num_blocks, self.block_size, self.width)
        kv = paged.index_select(0, ctx).view(-1, self.width)  # whole blocks
        s = ctx_len
        kv = kv[:s]  # [S, r + dr]
        latent, k_pe = kv.split([self.r, self.dr], dim=-1)
        k_nope, v = attn.decompress(latent)  # [S, H, dn], [S, H, dv]
        heads = k_nope.shape[1]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, n, dq]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(s, heads, self.dr)], dim=-1).transpose(0, 1)
        dq, dv = q.shape[-1], v.shape[-1]
        v = v.transpose(0, 1)  # [H, S, dv]
        if dv != dq:
            # equal head dims keep SDPA on its fused (flash) CPU kernel: O(n) extra memory
            v = F.pad(v, (0, dq - dv))
        # 4-D inputs: 3-D ones fall off the fused (flash) CPU kernel onto the math path,
        # which materialises the [H, n, S] scores
        q, k, v = q[None], k[None], v[None]
        scale = attn.softmax_scale
        if s == n:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        elif _FLASH_CPU is not None and q.device.type == "cpu":
            # Keys before the chunk are all visible, the chunk's own are causal: two fused
            # calls merged by their log-sum-exp, so no [n, S] mask is ever built and extra
            # memory stays O(n) however long the context is.
            p = s - n
            o_prior, lse_prior = _FLASH_CPU(q, k[:, :, :p], v[:, :, :p], 0.0, False, scale=scale)[
                :2
            ]
            o_own, lse_own = _FLASH_CPU(q, k[:, :, p:], v[:, :, p:], 0.0, True, scale=scale)[:2]
            lse = torch.logaddexp(lse_prior, lse_own)  # [1, H, n] float32
            o = o_prior * torch.exp(lse_prior - lse).unsqueeze(-1).to(o_prior.dtype)
            o = o + o_own * torch.exp(lse_own - lse).unsqueeze(-1).to(o_own.dtype)
        else:
            # query i sits at position s - n + i and sees keys 0..s - n + i
            mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]  # [n, S]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        o = o[0]  # [H, n, dq]
        return attn.output(o[..., :dv].transpose(0, 1))  # [n, D]
