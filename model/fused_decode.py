"""Decode-only CPU steps as C++ calls: all layers in one, or two a layer (``model/csrc``).

Eagerly, a decoder layer's decode step is ~50 ops (norms, projections, rotary, the absorbed
attention's bmm/softmax/bmm, the router, experts, adds), each a few microseconds of dispatch
and Python. For the few rows of a decode step on a small model that is most of the step, and
the engine fell behind llama.cpp at one stream for it. Where this project's C++ kernels are
built (``model.cpu_ext``), such a step runs each layer as:
- ``mla_decode``: ``x + attention(input_layernorm(x))``, absorbed MLA over the paged latent
  cache (writing the step's latents into their slots) — ``DeepseekV2Attention._decode``;
- ``moe_decode``: ``x + moe(post_attention_layernorm(x))`` — router, routed and shared
  experts (``DeepseekV2MoE``); ``mlp_decode`` for the dense layers.
The arithmetic is the eager path's (float32 accumulation; in bfloat16, values rounded where
the eager ops store bf16 tensors), so the two agree up to summation order; tests compare them.

A step qualifies when it is decode rows only, at most ``FUSED_MAX_ROWS`` of them (beyond,
torch's GEMMs beat the C++ products and per-op costs stop mattering), on the CPU in float32
or bfloat16 outside autograd. Per layer half, what the C++ code does not
cover runs eagerly instead: plain MHA attention (``use_mla: false``), projections with
biases, sigmoid / ``noaux_tc`` routers, MoE layers whose routed experts run elsewhere (an
expert executor) and weights not laid out for inference (``pack_for_inference``).

When every layer is covered, the model runs them all as one call (``decode_plan``): the
per-layer calls each cost a Python call and the conversion of ~20 arguments, which at one
decode row added up to about as much as the attention kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from model.attention import Attention, DeepseekV2Attention
from model.kernels import ext_for
from model.moe import DeepseekV2MLP, DeepseekV2MoE
from model.norm import RMSNorm
from model.step import StepMetadata

# The most decode rows a fused step takes, per dtype (engine_vs_hf / ab runs: see README).
FUSED_MAX_ROWS = {torch.float32: 32, torch.bfloat16: 32}


def step_qualifies(x: Tensor, step: StepMetadata | None) -> bool:
    """Whether this step's layers may run fused: x [T, D] decode rows only, few enough, on
    the CPU in a dtype the kernels take, no autograd, and the rows' context lengths known."""
    return (
        step is not None
        and not step.prefills
        and step.num_decodes == x.shape[0]
        and step.decode_lens is not None
        and step.block_tables is not None
        and x.dim() == 2
        and x.shape[0] <= FUSED_MAX_ROWS.get(x.dtype, 0)
        and ext_for(x) is not None
    )


# what a layer half runs on a fused step: x [B, D] -> the residual stream after that half
AttentionCall = Callable[[Tensor, Tensor, StepMetadata], Tensor]  # (x, rope, step)
FfnCall = Callable[[Tensor], Tensor]  # (x)
DecodePlan = Any  # torch.classes.dsv2_cpu.DecodePlan (a TorchScript class: no Python type)


class DecoderLayer(Protocol):
    """What decode_plan reads of a decoder layer (model.transformer.DeepseekV2DecoderLayer)."""

    self_attn: Attention
    input_layernorm: RMSNorm
    mlp: DeepseekV2MLP | DeepseekV2MoE
    post_attention_layernorm: RMSNorm


def attention_args(attn: Attention, norm: RMSNorm) -> tuple | None:
    """``mla_decode``'s arguments other than the step's, split around them: (weights,
    shape), or None where the C++ code does not cover this attention."""
    if (
        ext_for(norm.weight) is None
        or not isinstance(attn, DeepseekV2Attention)
        or attn._qkv_a is None
        or attn._w_uk_t is None
        or attn.o_proj.bias is not None
        or not attn.kv_b_proj.weight.is_contiguous()
        or attn.kv_cache is None
        or attn.kv_cache.dtype != norm.weight.dtype
    ):
        return None
    lora = attn.q_lora_rank is not None
    weights = (
        norm.weight,
        norm.eps,
        attn._qkv_a,  # [nq + r + dr, D]: q (or q_a) and kv_a stacked
        attn.q_a_layernorm.weight if lora else None,
        attn.q_b_proj.weight if lora else None,
        attn.kv_a_layernorm.weight,
        attn.kv_a_layernorm.eps,
        attn._w_uk_t,  # [H, r, dn]
        attn.kv_b_proj.weight,  # [H * (dn + dv), r]: W_UV read from it per head
        attn.o_proj.weight,
        attn.kv_cache,
    )
    shape = (
        attn.num_heads,
        attn.qk_nope_head_dim,
        attn.qk_rope_head_dim,
        attn.v_head_dim,
        attn.softmax_scale,
    )
    return weights, shape


def attention_call(attn: Attention, norm: RMSNorm) -> AttentionCall | None:
    """``x + attn(norm(x))`` as one ``mla_decode`` call with this layer's weights bound once
    (a decode step then pays one op dispatch for the half), or None where the C++ code does
    not cover this attention (the caller runs it eagerly)."""
    args = attention_args(attn, norm)
    if args is None:
        return None
    weights, shape = args
    op = ext_for(norm.weight).mla_decode.default  # the overload itself: no overload resolution

    def run(x: Tensor, rope: Tensor, step: StepMetadata) -> Tensor:
        lens, tables = step.decode_lens, step.block_tables
        return op(x, *weights, step.slot_mapping, tables, lens, rope, *shape)

    return run


def ffn_args(mlp: DeepseekV2MLP | DeepseekV2MoE, norm: RMSNorm) -> tuple[str, tuple] | None:
    """("mlp", ``mlp_decode``'s arguments but x) or ("moe", ``moe_decode``'s), or None where
    the C++ code does not cover this MLP."""
    if ext_for(norm.weight) is None:
        return None
    if isinstance(mlp, DeepseekV2MLP):
        if mlp._gate_up is None or mlp.down_proj.bias is not None:
            return None
        return "mlp", (norm.weight, norm.eps, mlp._gate_up, mlp.down_proj.weight)
    gate, experts, shared = mlp.gate, mlp.experts, mlp.shared_experts
    if (
        mlp._executor is not None
        or experts is None
        or gate.scoring_func != "softmax"
        or gate.topk_method not in ("greedy", "group_limited_greedy")
        or experts.gate_up.dtype != norm.weight.dtype
        or experts.gate_up.stride(-1) != 1
        or experts.down.stride(-1) != 1
        or (shared is not None and (shared._gate_up is None or shared.down_proj.bias is not None))
    ):
        return None
    grouped = gate.topk_method == "group_limited_greedy"
    return "moe", (
        norm.weight,
        norm.eps,
        gate._float_weight(),  # [E, D] float32: the router runs in float32
        gate.top_k,
        gate.n_group if grouped else 1,
        gate.topk_group if grouped else 1,
        bool(gate.norm_topk_prob),
        float(gate.routed_scaling_factor),
        experts.gate_up,
        experts.down,
        experts.start,
        None if shared is None else shared._gate_up,
        None if shared is None else shared.down_proj.weight,
    )


def ffn_call(mlp: DeepseekV2MLP | DeepseekV2MoE, norm: RMSNorm) -> FfnCall | None:
    """``x + mlp(norm(x))`` as one call (``mlp_decode`` / ``moe_decode``) with the weights
    bound once, or None where not covered."""
    bound = ffn_args(mlp, norm)
    if bound is None:
        return None
    kind, args = bound
    op = getattr(ext_for(norm.weight), f"{kind}_decode").default
    return lambda x: op(x, *args)


def decode_plan(layers: Sequence[DecoderLayer]) -> DecodePlan | None:
    """All ``layers`` of a decode step as one C++ call (``dsv2_cpu::DecodePlan``):
    ``plan.run(x, slots, tables, lens, rope)`` runs each layer's two halves as the per-layer
    calls above would, without returning to Python in between. None where some half is not
    covered (the caller then runs layer by layer)."""
    plan = None
    for layer in layers:
        attn = attention_args(layer.self_attn, layer.input_layernorm)
        ffn = ffn_args(layer.mlp, layer.post_attention_layernorm)
        if attn is None or ffn is None:
            return None
        if plan is None:
            plan = torch.classes.dsv2_cpu.DecodePlan()
        weights, shape = attn
        plan.add_mla(*weights, *shape)
        kind, args = ffn
        getattr(plan, f"add_{kind}")(*args)
    return plan
