"""The absorbed decode path (W_UK into the query, W_UV into the output, MQA over the cached
latents) gives the same logits as the full prefill pass, token by token."""

from __future__ import annotations

import pytest
import torch

import model
from model.decode import LatentCache, absorbed_attention, decode_step, decompressed_attention
from tests.support.checkpoints import write_random_checkpoint


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_token_by_token_decode_equals_prefill(tmp_path, q_lora_rank):
    path = write_random_checkpoint(tmp_path, seed=5, q_lora_rank=q_lora_rank)
    m = model.load_pretrained(path)
    ids = torch.randint(0, m.config.vocab_size, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids[None])[0]  # [T, V] one causal pass
    cache = LatentCache(m, capacity=48)
    # 16-token chunk first (chunked prefill through the cache), then one token at a time.
    steps = [decode_step(m, cache, ids[:16])]
    steps += [decode_step(m, cache, ids[t : t + 1]) for t in range(16, 48)]
    decoded = torch.cat(steps)
    assert cache.length == 48
    assert cache.data.shape[-1] == m.config.kv_lora_rank + m.config.qk_rope_head_dim
    assert (decoded - full).abs().max().item() <= 1e-5


def test_primitive_shapes_and_both_attention_paths_agree(tiny_checkpoint):
    m = model.load_pretrained(tiny_checkpoint)
    cfg = m.config
    attn = m.model.layers[1].self_attn
    h, dn, dr, dv, r = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    x = torch.randn(10, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100, 110)
    with torch.no_grad():
        q_nope, q_pe, latent, k_pe = attn.project(x, positions)
        assert q_nope.shape == (10, h, dn) and q_pe.shape == (10, h, dr)
        assert latent.shape == (10, r) and k_pe.shape == (10, dr)
        k_nope, v = attn.decompress(latent)
        assert k_nope.shape == (10, h, dn) and v.shape == (10, h, dv)
        q_latent = attn.absorb_query(q_nope)
        assert q_latent.shape == (10, h, r)
        # q_nope . k_nope == q_latent . latent (W_UK absorbed)
        torch.testing.assert_close(
            torch.einsum("thd,shd->ths", q_nope, k_nope),
            torch.einsum("thr,sr->ths", q_latent, latent),
            rtol=1e-5,
            atol=1e-5,
        )
        o_latent = torch.randn(10, h, r)
        # latent_to_output == output(W_UV applied per head)
        w_uv = attn.kv_b_proj.weight.view(h, dn + dv, r)[:, dn:]
        torch.testing.assert_close(
            attn.latent_to_output(o_latent),
            attn.output(torch.einsum("thr,hvr->thv", o_latent, w_uv)),
            rtol=1e-5,
            atol=1e-5,
        )
        assert attn.output(torch.randn(10, h, dv)).shape == (10, cfg.hidden_size)
        cache = torch.cat([latent, k_pe], dim=-1)  # [S, r + dr]
        a = absorbed_attention(attn, q_nope, q_pe, cache, positions - 100)
        b = decompressed_attention(attn, q_nope, q_pe, cache, positions - 100)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # YaRN: softmax scale = qk_head_dim^-0.5 * (0.1 * mscale_all_dim * ln(factor) + 1)^2
    mscale = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1
    assert attn.softmax_scale == pytest.approx((dn + dr) ** -0.5 * mscale**2)
