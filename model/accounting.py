"""Parameter and KV-cache arithmetic from a config alone (no weights needed).

Used by docs, benchmarks and capacity planning (how many tokens fit in a cache budget).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import DeepseekV2Config

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def dtype_bytes(dtype: str | object) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every weight in the checkpoint
    # Weights one token computes with: routed experts count K of E, and the input embedding
    # table is left out (a token reads one row of it, it multiplies nothing); lm_head counts.
    # This is the convention that reproduces DeepSeek's published "21B" (V2) and "2.4B" (Lite).
    active: int
    embedding: int  # embed_tokens + lm_head (both in total)
    routed_experts: int  # all routed experts of all MoE layers (in total)


def attention_params(cfg: DeepseekV2Config) -> int:
    h, d = cfg.num_attention_heads, cfg.hidden_size
    bias = cfg.attention_bias
    if not cfg.use_mla:  # q, k, v, o projections
        q_out, kv_out = h * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        weights = d * q_out + 2 * d * kv_out + q_out * d
        return weights + ((q_out + 2 * kv_out + d) if bias else 0)
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + (cfg.q_lora_rank if bias else 0)  # q_a_proj
        q += cfg.q_lora_rank  # q_a_layernorm
        q += cfg.q_lora_rank * h * cfg.qk_head_dim  # q_b_proj
    kv = d * cfg.latent_cache_dim + (cfg.latent_cache_dim if bias else 0)  # kv_a_proj_with_mqa
    kv += cfg.kv_lora_rank  # kv_a_layernorm
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b_proj
    o = h * cfg.v_head_dim * d + (d if bias else 0)
    return q + kv + o


def param_counts(cfg: DeepseekV2Config) -> ParamCounts:
    d = cfg.hidden_size
    table = cfg.vocab_size * d
    embedding = table * (1 if cfg.tie_word_embeddings else 2)
    total = embedding + d  # + final norm
    active = table + d  # lm_head + final norm
    routed_all = 0
    expert = 3 * d * cfg.moe_intermediate_size  # one SwiGLU expert
    for i in range(cfg.num_hidden_layers):
        common = attention_params(cfg) + 2 * d  # + the two layer norms
        if cfg.is_moe_layer(i):
            common += cfg.n_routed_experts * d  # router
            if cfg.topk_method == "noaux_tc":
                common += cfg.n_routed_experts  # its e_score_correction_bias
            common += (cfg.n_shared_experts or 0) * expert
            routed_all += cfg.n_routed_experts * expert
            active += common + cfg.num_experts_per_tok * expert
            total += common + cfg.n_routed_experts * expert
        else:
            mlp = 3 * d * cfg.intermediate_size
            active += common + mlp
            total += common + mlp
    return ParamCounts(total=total, active=active, embedding=embedding, routed_experts=routed_all)


def kv_cache_bytes_per_token(cfg: DeepseekV2Config, dtype: str | object = "bfloat16") -> int:
    """What the engine caches per token: every layer's ``cache_dim`` values (MLA: cat(latent,
    k_pe) = kv_lora_rank + qk_rope_head_dim; plain MHA: keys and values of every kv head)."""
    return cfg.num_hidden_layers * cfg.cache_dim * dtype_bytes(dtype)


def mha_cache_bytes_per_token(cfg: DeepseekV2Config, dtype: str | object = "bfloat16") -> int:
    """What the same model would cache as plain MHA: per layer per head a key of qk_head_dim
    (nope + rope) and a value of v_head_dim."""
    if not cfg.use_mla:  # it is plain MHA already
        return kv_cache_bytes_per_token(cfg, dtype)
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * dtype_bytes(dtype)


def kv_cache_reduction(cfg: DeepseekV2Config) -> float:
    """Fraction of the MHA cache that MLA saves (0.9 = 90% smaller)."""
    return 1.0 - kv_cache_bytes_per_token(cfg) / mha_cache_bytes_per_token(cfg)
