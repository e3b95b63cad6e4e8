"""The decoder: embeddings, attention (MLA, or plain MHA under ``use_mla: false``) + (dense FFN |
MoE) layers, final norm, LM head.

One forward for everything: ``model(input_ids [B, T])`` is the full causal pass (training,
tests); ``model(input_ids [T] | inputs_embeds [T, D], positions [T], step)`` is one engine
step over packed tokens and the paged latent cache (``model.step.StepMetadata``), returning
logits only for the step's sampling rows.

Module names mirror Hugging Face's ``DeepseekV2ForCausalLM`` so checkpoint tensor names map
one to one (``model.layers.{i}.self_attn.kv_b_proj.weight`` ...).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from model import fused_decode
from model.attention import (
    Attention,
    DeepseekV2Attention,
    MultiHeadAttention,
    RopeTables,
    make_attention,
)
from model.config import DeepseekV2Config
from model.linear import Linear
from model.moe import DeepseekV2MLP, DeepseekV2MoE, ExpertExecutor, MoEGate, RoutedExperts
from model.norm import RMSNorm
from model.packing import transpose_linears
from model.rope import RotaryEmbedding
from model.step import StepMetadata

ExpertsSpec = Literal["all", "none"] | tuple[int, int]


def moe_layer_indices(config: DeepseekV2Config) -> list[int]:
    """Indices of the decoder layers whose FFN is a MoE layer."""
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def expert_slice(config: DeepseekV2Config, experts: ExpertsSpec) -> tuple[int, int] | None:
    """Normalise the ``experts`` argument to a [start, end) slice, or None for no experts."""
    n = config.n_routed_experts or 0
    if experts == "all":
        return (0, n)
    if experts == "none":
        return None
    if isinstance(experts, tuple | list) and len(experts) == 2:
        start, end = int(experts[0]), int(experts[1])
        if not 0 <= start < end <= n:
            raise ValueError(f"expert slice [{start}, {end}) is outside [0, {n})")
        return (start, end)
    raise ValueError(f"experts must be 'all', 'none' or (start, end), got {experts!r}")


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(
        self,
        config: DeepseekV2Config,
        layer_idx: int,
        rotary: RotaryEmbedding,
        experts: tuple[int, int] | None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        # decode-only CPU steps as C++ calls where built (model.fused_decode); off: op by op
        self.use_fused_decode = True
        self._fused: tuple | None = None  # (cache, attention call, ffn call): fused_calls
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: Attention = make_attention(config, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: DeepseekV2MLP | DeepseekV2MoE = (
            DeepseekV2MoE(config, layer_idx, experts)
            if config.is_moe_layer(layer_idx)
            else DeepseekV2MLP(config)
        )

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RopeTables,
        step: StepMetadata | None = None,
        with_balance_loss: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, step)
        h = self.post_attention_layernorm(x)
        if with_balance_loss and isinstance(self.mlp, DeepseekV2MoE):
            out, loss = self.mlp(h, with_balance_loss=True)
            return x + out, loss
        return x + self.mlp(h), None

    def fused_calls(self) -> tuple[fused_decode.AttentionCall | None, fused_decode.FfnCall | None]:
        """This layer's halves as model.fused_decode calls (None: that half runs eagerly),
        built once and rebuilt when the paged cache bound to the layer changes."""
        cache = self.self_attn.kv_cache
        if self._fused is None or self._fused[0] is not cache:
            attn = fused_decode.attention_call(self.self_attn, self.input_layernorm)
            ffn = fused_decode.ffn_call(self.mlp, self.post_attention_layernorm)
            self._fused = (cache, attn, ffn)
        return self._fused[1], self._fused[2]

    def fused_step(
        self, x: Tensor, positions: Tensor, rope: RopeTables, step: StepMetadata
    ) -> Tensor:
        """A decode-only step (``fused_decode.step_qualifies``): each half one C++ call, or
        eager where that half is not covered."""
        attn, ffn = self.fused_calls()
        if attn is not None:
            x = attn(x, rope, step)
        else:
            x = x + self.self_attn(self.input_layernorm(x), positions, rope, step)
        return ffn(x) if ffn is not None else x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV2Model(nn.Module):
    def __init__(self, config: DeepseekV2Config, experts: tuple[int, int] | None) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekV2DecoderLayer(config, i, self.rotary, experts)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # (each layer's bound cache, the plan running all layers of a fused step): fused_plan
        self._plan: tuple[tuple, fused_decode.DecodePlan | None] | None = None

    def fused_plan(self) -> fused_decode.DecodePlan | None:
        """All layers of a fused decode step as one C++ call (``fused_decode.decode_plan``),
        or None where some layer half runs otherwise; rebuilt when the bound caches change
        (``forget_fused_plan`` drops it when weights or settings change)."""
        caches = tuple(layer.self_attn.kv_cache for layer in self.layers)
        plan = self._plan
        if plan is None or any(a is not b for a, b in zip(plan[0], caches, strict=True)):
            fused = all(layer.use_fused_decode for layer in self.layers)
            plan = (caches, fused_decode.decode_plan(self.layers) if fused else None)
            self._plan = plan
        return plan[1]

    def forget_fused_plan(self) -> None:
        self._plan = None

    def forward(
        self,
        input_ids: Tensor | None = None,
        positions: Tensor | None = None,
        step: StepMetadata | None = None,
        inputs_embeds: Tensor | None = None,
        with_balance_loss: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """input_ids [B, T] (or inputs_embeds [B, T, D]) -> final hidden states [B, T, D]
        (+ summed balance loss). With a step: [T] / [T, D] packed tokens -> [N, D] for the
        step's sampling rows."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = torch.arange(x.shape[-2], device=x.device)
        # once for all layers; a step knows its largest position without a device sync
        rope = self.rotary.lookup(positions, None if step is None else step.max_position)
        total_loss: Tensor | None = None
        # decode rows only, few of them, on the CPU: each layer as C++ calls (model.fused_decode)
        fused = step is not None and fused_decode.step_qualifies(x, step)
        plan = self.fused_plan() if fused else None
        if plan is not None:
            x = plan.run(x, step.slot_mapping, step.block_tables, step.decode_lens, rope)
        for layer in self.layers if plan is None else ():
            if fused and layer.use_fused_decode:
                x = layer.fused_step(x, positions, rope, step)
                continue
            x, loss = layer(x, positions, rope, step, with_balance_loss)
            if loss is not None:
                total_loss = loss if total_loss is None else total_loss + loss
        if step is not None and step.sample_rows is not None:
            x = x.index_select(0, step.sample_rows)  # only sampling rows reach the head
        return self.norm(x), total_loss


class DeepseekV2ForCausalLM(nn.Module):
    """``m(input_ids [B, T]) -> logits [B, T, V]``: a full causal pass (no cache).

    ``experts``: "all" routed experts, "none" (an expert executor must be set), or a
    (start, end) slice of every MoE layer's experts.
    """

    def __init__(self, config: DeepseekV2Config, experts: ExpertsSpec = "all") -> None:
        super().__init__()
        self.config = config
        self.expert_slice = expert_slice(config, experts)
        self.model = DeepseekV2Model(config, self.expert_slice)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as the reference does: N(0, initializer_range), norms 1, biases 0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, MoEGate):
                module.weight.normal_(0.0, std, generator=generator)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                module.gate_up.normal_(0.0, std, generator=generator)
                module.down.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def moe_layers(self) -> list[DeepseekV2MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, DeepseekV2MoE)]

    def set_expert_executor(self, executor: ExpertExecutor | None) -> None:
        """Run every MoE layer's routed experts through ``executor`` (None: own experts)."""
        for moe in self.moe_layers():
            moe.executor = executor
        self._forget_fused_calls()  # whether a fused call covers the experts changed

    # ---- inference setup ---------------------------------------------------------------------
    @torch.no_grad()
    def pack_for_inference(self, prepack: bool = False) -> None:
        """Lay the weights out for inference, once, after loading (values unchanged): the
        fusions each module's ``packed_modules_mapping`` lists (q/q_a + kv_a, gate + up), the
        absorbed W_UK / W_UV, routed experts stored for the grouped matmul, float32 weights
        transposed (model.packing). ``prepack``: also keep oneDNN pre-packed copies of what a
        decode step reads besides the routed experts (half precision on CPU; a second copy
        of those weights, see model.linear). Idempotent."""
        for module in self.modules():
            if isinstance(
                module, DeepseekV2Attention | MultiHeadAttention | DeepseekV2MLP | RoutedExperts
            ):
                module.pack_for_inference()
        self._forget_fused_calls()  # fused calls bind the inference layout built here
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        # a tied lm_head keeps the embedding's row-major layout (row lookups)
        transpose_linears(self, keep=[self.lm_head] if tied else [])
        if prepack:
            for module in self.modules():
                if isinstance(module, DeepseekV2Attention | MultiHeadAttention | DeepseekV2MLP):
                    module.prepack_for_inference()
            self.lm_head.prepack_for_inference()

    def set_fused_decode(self, enabled: bool) -> None:
        """Run decode-only CPU steps through model.fused_decode (True, the default) or op by
        op (False: the eager reference the fused calls are tested against)."""
        for layer in self.model.layers:
            layer.use_fused_decode = enabled
        self._forget_fused_calls()

    def _forget_fused_calls(self) -> None:
        """Drop each layer's bound fused calls; the next fused step builds them again from
        the current weights and expert placement."""
        for layer in self.model.layers:
            layer._fused = None
        self.model.forget_fused_plan()

    def bind_kv_cache(self, cache: Tensor | None) -> None:
        """Give each layer its part of the paged cache [L, num_blocks, block_size,
        config.cache_dim] (views, no copy; None unbinds). Engine steps write and read it."""
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.kv_cache = None if cache is None else cache[i]

    def forward(
        self,
        input_ids: Tensor | None = None,
        positions: Tensor | None = None,
        step: StepMetadata | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        return_balance_loss: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """input_ids [B, T] (or inputs_embeds [B, T, D]) -> logits [B, T, V], a full causal
        pass; with return_balance_loss also the expert balance loss summed over MoE layers
        (0 for a model without MoE layers). ``logits_at`` [B, T] bool: logits [N, V] at those
        positions only (a training step takes its loss at the replies' tokens alone, and the
        head over every position cost ~7% of a text step).

        With ``step``: one engine step over packed tokens, input_ids [T] (or inputs_embeds
        [T, D]) at ``positions`` [T] -> logits [N, V] of the step's sampling rows, in the
        model's dtype."""
        hidden, loss = self.model(input_ids, positions, step, inputs_embeds, return_balance_loss)
        if logits_at is not None:
            hidden = hidden[logits_at]  # [N, D]
        logits = self.lm_head(hidden)
        if not return_balance_loss:
            return logits
        if loss is None:
            loss = logits.new_zeros(())
        return logits, loss
