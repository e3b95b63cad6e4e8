"""The memory floor of a decode step: the bytes it must read over the bandwidth this machine
gives, measured in the same run.

A decode step of B sequences reads every weight it multiplies by once (plus each sequence's
latent cache), whatever the engine; on a CPU that is the bound small batches sit against. So
when an engine falls short of a peer, ``floor_tokens_per_second`` says whether anything is
left to gain: an engine already near the floor cannot go faster on this machine, one far
above it wastes time elsewhere (Python, kernel launches, re-layouts).

Bandwidth is a plain copy of a buffer much larger than the caches (read + write counted, as
STREAM's "copy" does), with the torch thread count the engines use.
"""

from __future__ import annotations

import time

import torch

from model.accounting import attention_params, dtype_bytes
from model.config import DeepseekV2Config


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` copies of a `megabytes` float32 buffer
    (read + write), with torch's current thread count."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device="cpu")
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def distinct_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of routed experts of one layer that `tokens` tokens reach when each
    picks `top_k` of `n_experts` uniformly (random weights route close to uniformly)."""
    untouched = (1 - top_k / n_experts) ** tokens
    return n_experts * (1 - untouched)


def decode_step_bytes(
    cfg: DeepseekV2Config, dtype: str | torch.dtype, batch: int, context: int
) -> float:
    """Bytes one decode step of `batch` sequences at `context` tokens each must read: every
    non-expert weight it multiplies by (attention, dense and shared MLPs, routers, norms,
    lm_head; one embedding row per sequence), the routed experts the batch reaches, and the
    latent cache of every sequence."""
    el = dtype_bytes(dtype)
    d = cfg.hidden_size
    expert = 3 * d * cfg.moe_intermediate_size
    params = cfg.vocab_size * d + d  # lm_head + final norm
    params += batch * d  # embedding rows
    for i in range(cfg.num_hidden_layers):
        params += attention_params(cfg) + 2 * d
        if cfg.is_moe_layer(i):
            params += cfg.n_routed_experts * d + (cfg.n_shared_experts or 0) * expert
            reached = distinct_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
            params += reached * expert
        else:
            params += 3 * d * cfg.intermediate_size
    cache = batch * context * cfg.num_hidden_layers * cfg.latent_cache_dim
    return (params + cache) * el


def floor_tokens_per_second(
    cfg: DeepseekV2Config,
    dtype: str | torch.dtype,
    batch: int,
    context: int,
    bandwidth: float,
) -> float:
    """New tokens per second an engine would reach if a decode step cost only its reads."""
    return batch * bandwidth / decode_step_bytes(cfg, dtype, batch, context)
