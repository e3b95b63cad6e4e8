"""The plain reference decode over a contiguous latent cache, built only from the MLA primitives.

Not the serving path: the engine runs the model's own forward over the paged cache
(``model(input_ids, positions, step)``, model.attention). This is the small, obviously-correct
version of that for tests: per layer the cache holds ``cat(latent, k_pe)`` (r + dr values)
per token, and attention runs MQA-style with W_UK absorbed into the query and W_UV into the
output, written out op by op. Tests use it to show the absorbed path equals the full prefill
pass and the engine's greedy tokens equal it; the benchmark compares it to decompressing K/V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.attention import DeepseekV2Attention
from model.transformer import DeepseekV2ForCausalLM


def _causal_mask(q_positions: Tensor | None, n_keys: int, device: torch.device) -> Tensor | None:
    """[T, 1, S] bool, True where key position > query position (masked)."""
    if q_positions is None:
        return None
    k_positions = torch.arange(n_keys, device=device)
    return (k_positions[None, :] > q_positions[:, None]).unsqueeze(1)


def absorbed_attention(
    attn: DeepseekV2Attention,
    q_nope: Tensor,
    q_pe: Tensor,
    cache: Tensor,
    q_positions: Tensor | None = None,
) -> Tensor:
    """q_nope [T,H,dn], q_pe [T,H,dr], cache [S, r+dr] (positions 0..S-1) -> [T, D].

    q_positions [T]: mask keys after each query (None: every query sees the whole cache)."""
    t, h, _ = q_nope.shape
    r = attn.kv_lora_rank
    q = torch.cat([attn.absorb_query(q_nope), q_pe], dim=-1)  # [T, H, r + dr]
    scores = torch.matmul(q.reshape(t * h, -1), cache.t()).view(t, h, -1)  # [T, H, S]
    scores = scores.float() * attn.softmax_scale
    mask = _causal_mask(q_positions, cache.shape[0], cache.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    p = scores.softmax(dim=-1).to(cache.dtype)
    o_latent = torch.matmul(p.view(t * h, -1), cache[:, :r]).view(t, h, r)  # [T, H, r]
    return attn.latent_to_output(o_latent)


def decompressed_attention(
    attn: DeepseekV2Attention,
    q_nope: Tensor,
    q_pe: Tensor,
    cache: Tensor,
    q_positions: Tensor | None = None,
) -> Tensor:
    """Same result as ``absorbed_attention`` by decompressing every cached latent into
    per-head keys and values first (the naive way; costs S*r*H*(dn+dv) per step)."""
    r = attn.kv_lora_rank
    k_nope, v = attn.decompress(cache[:, :r])  # [S, H, dn], [S, H, dv]
    k_pe = cache[:, r:]  # [S, dr]
    scores = torch.einsum("thd,shd->ths", q_nope, k_nope) + torch.einsum("thd,sd->ths", q_pe, k_pe)
    scores = scores.float() * attn.softmax_scale
    mask = _causal_mask(q_positions, cache.shape[0], cache.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    p = scores.softmax(dim=-1).to(v.dtype)
    return attn.output(torch.einsum("ths,shd->thd", p, v))


class LatentCache:
    """Contiguous latent cache of one sequence: per layer [capacity, r + dr]."""

    def __init__(
        self, model: DeepseekV2ForCausalLM, capacity: int, dtype: torch.dtype | None = None
    ) -> None:
        cfg = model.config
        if not cfg.use_mla:
            raise ValueError("the reference latent decode is MLA's: this model has use_mla=false")
        dtype = dtype or model.lm_head.weight.dtype
        device = model.lm_head.weight.device
        self.data = torch.zeros(
            cfg.num_hidden_layers, capacity, cfg.latent_cache_dim, dtype=dtype, device=device
        )  # [L, S, r + dr]
        self.length = 0


@torch.no_grad()
def decode_step(model: DeepseekV2ForCausalLM, cache: LatentCache, token_ids: Tensor) -> Tensor:
    """Run ``token_ids`` [T] (the next T tokens of the sequence) through the model with the
    absorbed attention path, appending to ``cache``. Returns logits [T, V]."""
    t = token_ids.shape[0]
    start = cache.length
    positions = torch.arange(start, start + t, device=token_ids.device)
    rope = model.model.rotary.lookup(positions)
    x = model.model.embed_tokens(token_ids)  # [T, D]
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q_nope, q_pe, latent, k_pe = attn.project(layer.input_layernorm(x), positions, rope)
        cache.data[i, start : start + t] = torch.cat([latent, k_pe], dim=-1)
        kv = cache.data[i, : start + t]  # [S, r + dr]
        x = x + absorbed_attention(attn, q_nope, q_pe, kv, positions)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.length = start + t
    return model.lm_head(model.model.norm(x))


@torch.no_grad()
def greedy_generate(
    model: DeepseekV2ForCausalLM, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy continuation through the latent cache (prefill once, then one token per step)."""
    cache = LatentCache(model, len(prompt) + max_new_tokens)
    device = model.lm_head.weight.device
    logits = decode_step(model, cache, torch.tensor(prompt, device=device))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        logits = decode_step(model, cache, torch.tensor([nxt], device=device))
    return out
