"""Engine vs transformers `generate` (and llama.cpp) on the same random DeepSeek-V2.

Greedy, 32-token prompts, 128 new tokens: one stream, then 32 concurrent requests
(transformers as one padded batch). Both run in this one process, side by side (runs
interleaved, best of N), from the same checkpoint, in the same dtype (float32 unless
--dtype bfloat16, then both sides bfloat16) and with the same torch thread count. Prints
both sides' tokens/s, the ratios, PASS/FAIL per target and the thread count, and checks
the engine's tokens against the reference: teacher-forced through transformers, every token
the engine chose must be the reference's argmax or within a dtype-sized tolerance of it
(a near-tie; random weights are full of them), so a fast but wrong engine fails.

Targets (the execution-layer issue): with --llama-cpp DIR (a llama.cpp tree with
llama-batched-bench built, see llama_cpp_peer.py) the same checkpoint also runs through
llama.cpp, the fastest CPU engine for DeepSeek-V2 we know of, and the engine must reach
0.8x its tokens/s at one stream and 1.0x at 32 concurrent. With --small (6 layers, width
384, 16 experts top-4, 16 streams: a model where per-step overhead decides) the engine must
reach 2.5x transformers at 16 streams. Beside every setting the memory floor is printed:
the tokens/s a step that cost only its weight and cache reads would give at the bandwidth a
copy benchmark measures in this run (memory_floor.py), so a gap is explained, not guessed.

Threads default to 1: this is a 2-core machine where other work (tests, the demo trainer)
usually holds a core, and two OpenMP threads then stall at every barrier, which swings
either side's figure by up to 10x. One thread gives each side one whole core, so the ratio
measures the implementations. Use --threads 2 on an otherwise idle machine.

    python benchmarks/engine_vs_hf.py [--threads 1] [--dtype float32] [--repeats 3]
                                      [--llama-cpp DIR] [--small]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from benchmarks.bench_checkpoint import (
    BENCH_CONFIG,
    SMALL_CONFIG,
    random_prompts,
    timed_generate,
    write_checkpoint,
)
from benchmarks.llama_cpp_peer import convert, new_tokens_per_second
from benchmarks.memory_floor import copy_bandwidth, floor_tokens_per_second
from model.config import DeepseekV2Config

# engine tokens/s over llama.cpp's, and over transformers' for the small model
LLAMA_CPP_TARGETS = {"1 stream": 0.8, "concurrent": 1.0}
SMALL_MODEL_TARGET = 2.5


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)  # equal lengths: a padded batch with nothing to pad
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    return elapsed, out[:, ids.shape[1] :].tolist()


def worst_gap(hf, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Teacher-force transformers on prompt + the engine's tokens: the largest amount by which
    a token the engine picked falls short of the reference's best logit at its position.
    0 means every pick was the reference's argmax; a small value, that the engine took the
    other side of a near-tie (random weights are full of them, bfloat16 more so)."""
    worst = 0.0
    p = len(prompts[0])
    for i in range(0, len(prompts), 8):  # a few sequences at a time: [B, T, 32000] logits
        ids = torch.tensor(
            [a + b for a, b in zip(prompts[i : i + 8], outputs[i : i + 8], strict=True)]
        )
        with torch.inference_mode():
            logits = hf(ids).logits[:, p - 1 : -1].float()  # [B, N, V]: predicts each output
        picked = logits.gather(-1, ids[:, p:, None])[..., 0]
        worst = max(worst, float((logits.max(-1).values - picked).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, help="concurrent streams (32; 16 with --small)")
    ap.add_argument("--small", action="store_true", help="the 6-layer width-384 model")
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs (2N for 1 stream)")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp tree: also measure llama.cpp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = SMALL_CONFIG if args.small else BENCH_CONFIG
    if args.concurrency is None:
        args.concurrency = 16 if args.small else 32

    from transformers import DeepseekV2ForCausalLM

    from services.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        n_params = write_checkpoint(path, config)
        hf = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
        engine = Engine.from_pretrained(
            path, dtype=dtype, max_num_seqs=max(args.concurrency, 1), enable_prefix_caching=False
        )
        gguf_file = None
        if args.llama_cpp:
            gguf_file = convert(args.llama_cpp, path, path / "bench.gguf", args.dtype)
        verdicts = _compare(args, dtype, config, n_params, hf, engine, gguf_file)
    if not verdicts:
        print("no target in this setting: pass --llama-cpp DIR or --small")
    if verdicts:
        print(f"overall: {_verdict(all(verdicts))}")


def _compare(args, dtype, config, n_params, hf, engine, gguf_file) -> list[bool]:
    """Time the three side by side at 1 stream and at --concurrency; the verdicts."""
    print(
        f"model: random DeepSeek-V2, {n_params / 1e6:.0f}M parameters, {args.dtype} on both "
        f"sides, {torch.get_num_threads()} torch thread(s) on both sides"
    )
    prompts = random_prompts(args.concurrency, args.prompt_tokens)
    n = args.new_tokens

    # warm up both (first calls allocate and pick kernels)
    hf_generate(hf, prompts[:2], 4)
    timed_generate(engine, prompts[:2], 4)

    bandwidth = copy_bandwidth()
    cfg = DeepseekV2Config.from_dict(config)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} thread(s))")
    # Outputs are checked token by token against the reference's logits (see worst_gap):
    # float32 kernels that sum in another order move a logit by ~1e-5, bfloat16 ones by
    # a few hundredths (8-bit mantissa).
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    verdicts = []
    for label, batch in (("1 stream", prompts[:1]), (f"{args.concurrency} concurrent", prompts)):
        # interleave the three so that load from other processes hits all alike; best of N
        # (twice N for one stream: a few seconds a run, and the noisier measurement)
        hf_times, en_times, llama_runs = [], [], []
        for _ in range(args.repeats * (2 if len(batch) == 1 else 1)):
            t, hf_out = hf_generate(hf, batch, n)
            hf_times.append(t)
            t, en_out = timed_generate(engine, batch, n)
            en_times.append(t)
            if gguf_file is not None:
                run = new_tokens_per_second(
                    args.llama_cpp, gguf_file, args.threads, args.prompt_tokens, n, [len(batch)]
                )
                llama_runs.append(run[len(batch)])
        tokens = len(batch) * n
        hf_tps, en_tps = tokens / min(hf_times), tokens / min(en_times)
        llama_tps = max(llama_runs, default=0.0)
        same = sum(a == b for a, b in zip(hf_out, en_out, strict=True))
        gap = worst_gap(hf, batch, en_out)
        exact = gap <= tolerance
        print(
            f"{label:>14}: transformers {hf_tps:8.1f} tok/s   engine {en_tps:8.1f} tok/s   "
            f"ratio {en_tps / hf_tps:5.2f}x   ({same}/{len(batch)} outputs identical; every "
            f"engine token within {gap:.1e} of the reference's best logit, allowed "
            f"{tolerance:.0e}: {'ok' if exact else 'WRONG'})",
            flush=True,
        )
        # the average context of a step over the run: prompt + half the new tokens
        floor = floor_tokens_per_second(
            cfg, args.dtype, len(batch), args.prompt_tokens + n // 2, bandwidth
        )
        print(
            f"{'':>14}  memory floor {floor:8.1f} tok/s: engine at {en_tps / floor:4.0%} of it",
            flush=True,
        )
        if args.small and len(batch) > 1:
            ok = en_tps / hf_tps >= SMALL_MODEL_TARGET
            print(f"{'':>14}  target >= {SMALL_MODEL_TARGET}x transformers: {_verdict(ok)}")
            verdicts.append(ok and exact)
        if llama_tps:
            target = LLAMA_CPP_TARGETS["1 stream" if len(batch) == 1 else "concurrent"]
            ok = en_tps / llama_tps >= target
            print(
                f"{'':>14}  llama.cpp {llama_tps:8.1f} tok/s ({llama_tps / hf_tps:5.2f}x "
                f"transformers, {llama_tps / floor:4.0%} of the floor): engine = "
                f"{en_tps / llama_tps:4.2f}x llama.cpp, target >= {target}x: {_verdict(ok)}",
                flush=True,
            )
            verdicts.append(ok and exact)
        if not exact:
            verdicts.append(False)
    return verdicts


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


if __name__ == "__main__":
    main()
