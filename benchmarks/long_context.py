"""A 131,072-token prompt through the engine on a tiny YaRN DeepSeek-V2 config.

Prefill runs in chunks of --chunk tokens (the per-step token budget); each chunk attends
over the sequence's cached latents, so memory grows linearly with the prompt. Each length
runs in a fresh process so that peak RSS is that run's own. Prints prefill time, decode
time per token, the latent cache size and peak memory.

    python benchmarks/long_context.py [--tokens 32768 65536 131072] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from benchmarks.bench_checkpoint import RELEASED_YARN

# Tiny but with the released models' long-context RoPE: YaRN factor 40 over 4K -> 160K.
LONG_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=163_840,
    rope_scaling=RELEASED_YARN,
)


def single(tokens: int, chunk: int, decode: int, threads: int) -> dict:
    import torch

    import model
    from services.engine import Engine, EngineOptions, SamplingParams

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = model.DeepseekV2ForCausalLM(model.DeepseekV2Config(**LONG_CONFIG))
    engine = Engine(
        m,
        None,
        EngineOptions(
            block_size=64,
            cache_tokens=tokens + decode + 64,
            max_num_seqs=1,
            max_num_batched_tokens=chunk,
            enable_prefix_caching=False,
        ),
    )
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, LONG_CONFIG["vocab_size"], (tokens,), generator=g).tolist()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True))
    first = None
    out: list[int] = []
    while engine.has_unfinished():
        for d in engine.step():
            out += d.token_ids
            if first is None and d.token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    assert len(out) == decode, out
    cache_bytes = engine.runner.cache.numel() * engine.runner.cache.element_size()
    return {
        "tokens": tokens,
        "prefill_s": round(first - start, 2),
        "decode_ms_per_token": round((end - first) / max(decode - 1, 1) * 1000, 1),
        "cache_mib": round(cache_bytes / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_growth_mib": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1
        ),
        "generated": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131_072])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(single(args.tokens[0], args.chunk, args.decode, args.threads)))
        return
    print(
        f"tiny YaRN DeepSeek-V2 (factor 40, context {LONG_CONFIG['max_position_embeddings']}), chunk {args.chunk}"
    )
    for n in args.tokens:
        cmd = [sys.executable, __file__, "--single", "--tokens", str(n), "--chunk", str(args.chunk)]
        cmd += ["--decode", str(args.decode), "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"{res['tokens']:>7} tokens: prefill {res['prefill_s']:7.1f} s, "
            f"decode {res['decode_ms_per_token']:6.1f} ms/token, latent cache {res['cache_mib']} MiB, "
            f"peak RSS {res['peak_rss_mib']} MiB (+{res['rss_growth_mib']} MiB during the run)",
            flush=True,
        )


if __name__ == "__main__":
    main()
