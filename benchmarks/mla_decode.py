"""MLA decode attention: absorbed (MQA over cached latents) vs decompressing K/V per step.

One decode step (batch 1, one new token) of a DeepSeek-V2-Lite-shaped attention layer (hidden
2048, 16 heads, kv_lora_rank 512, nope 128 / rope 64 / v 128, no q compression) at context
1K, 4K and 16K, in bf16 and fp32. Both paths read the same latent cache (576 values per token);
"decompress" runs every cached latent through kv_b_proj each step, "absorbed" folds W_UK into
the query and W_UV into the output. For reference, "mha" is plain attention over a cache that
already holds decompressed per-head K/V (8.9x the memory). Prints times, ratios and sizes.

    .venv/bin/python benchmarks/mla_decode.py [--threads 2] [--contexts 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from benchmarks.bench_checkpoint import RELEASED_YARN
from model.accounting import kv_cache_reduction
from model.attention import DeepseekV2Attention
from model.config import DeepseekV2Config
from model.decode import absorbed_attention, decompressed_attention

LITE_LAYER = dict(
    vocab_size=1024,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=1,
    num_attention_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    rope_scaling=RELEASED_YARN,
)


def timed(fn, budget_s: float = 1.5, max_reps: int = 50) -> float:
    """Median seconds per call (after one warm-up), within a time budget."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def bench(attn: DeepseekV2Attention, context: int, dtype: torch.dtype) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    d, h = attn.o_proj.out_features, attn.num_heads
    r, dr = attn.kv_lora_rank, attn.qk_rope_head_dim
    x = torch.randn(1, d, generator=g).to(dtype)
    cache = torch.randn(context + 1, r + dr, generator=g).to(dtype)  # latent cache [S, 576]
    pos = torch.tensor([context])
    # The MHA reference cache: decompressed keys and values per head, computed once.
    k_nope, v = attn.decompress(cache[:, :r])
    k = torch.cat([k_nope, cache[:, None, r:].expand(-1, h, -1)], dim=-1).transpose(0, 1)
    v = v.transpose(0, 1).contiguous()  # [H, S, dv]
    k = k.contiguous()  # [H, S, dq]

    def step(attend):
        def run():
            q_nope, q_pe, latent, k_pe = attn.project(x, pos)
            cache[-1, :r], cache[-1, r:] = latent[0], k_pe[0]
            return attend(attn, q_nope, q_pe, cache)

        return run

    def mha():
        q_nope, q_pe, _, _ = attn.project(x, pos)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, 1, dq]
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.softmax_scale)
        return attn.output(o.transpose(0, 1))

    with torch.inference_mode():
        out = {
            "absorbed": timed(step(absorbed_attention)),
            "decompress": timed(step(decompressed_attention), max_reps=10),
            "mha": timed(mha),
        }
        a = step(absorbed_attention)().float()
        b = step(decompressed_attention)().float()
        out["max_rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = DeepseekV2Config(**LITE_LAYER)
    latent = config.latent_cache_dim
    mha_width = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    print(
        f"V2-Lite-shaped layer, batch 1, {args.threads} threads. Cache per token per layer: "
        f"latent {latent} values vs MHA {mha_width} -> {1 - latent / mha_width:.2%} smaller "
        f"({mha_width / latent:.1f}x); full V2 (128 heads): "
        f"{kv_cache_reduction(DeepseekV2Config(**{**LITE_LAYER, 'num_attention_heads': 128})):.2%}"
    )
    print(
        f"{'dtype':>8} {'context':>7} {'absorbed ms':>11} {'decompress ms':>13} {'speedup':>8} "
        f"{'mha ms':>8} {'abs/mha':>7} {'cache MiB lat/mha':>18} {'rel diff':>9}"
    )
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        attn = DeepseekV2Attention(config).to(dtype).eval()
        with torch.no_grad():
            for p in attn.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        size = torch.finfo(dtype).bits // 8
        for context in args.contexts:
            r = bench(attn, context, dtype)
            mib_latent = context * latent * size / 2**20
            mib_mha = context * mha_width * size / 2**20
            print(
                f"{str(dtype).removeprefix('torch.'):>8} {context:>7} "
                f"{r['absorbed'] * 1e3:>11.2f} {r['decompress'] * 1e3:>13.2f} "
                f"{r['decompress'] / r['absorbed']:>7.1f}x {r['mha'] * 1e3:>8.2f} "
                f"{r['mha'] / r['absorbed']:>6.2f}x {mib_latent:>8.1f} / {mib_mha:<7.1f} "
                f"{r['max_rel_diff']:>9.1e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
