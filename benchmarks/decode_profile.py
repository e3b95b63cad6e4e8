"""Where a decode step's time goes, against the memory floor, on the engine's own forward.

One decode step of B rows (default 1 and 32) of the random DeepSeek-V2 of engine_vs_hf.py is
run through the model the engine builds (its weight layouts, its paged cache) and timed
without a profiler (best of N); then torch.profiler splits one run of the same steps into
- weights: the products with weight matrices (GEMV ``addmv``, GEMM ``mm``/``addmm``,
  the grouped expert kernel, oneDNN's pre-packed linear): the part a step's weight reads bound;
- batched products (``bmm``/``baddbmm``): the absorbed attention over the latent cache, and
  in half precision also the routed experts' padded form (model.moe), so a share of it is
  weight reads there;
- attention rest: softmax, the cache gather and write;
- other ops: elementwise work, routing, views: each a few microseconds of dispatch.
Those shares are applied to the unprofiled time (the profiler inflates short ops). Beside
them: the floor (bytes the step must read, model.accounting via memory_floor, over the
bandwidth a large one-row product reads at in this run, i.e. what the best weight-read kernel
torch has reaches here), and the weight kernels' own bandwidth. So a gap splits into per-op
overhead (other ops), kernels slower than the floor (weights above floor), and attention.

    python benchmarks/decode_profile.py [--dtype float32] [--threads 1] [--rows 1 32]
                                        [--context 96] [--repeats 20] [--small]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from benchmarks.bench_checkpoint import BENCH_CONFIG, SMALL_CONFIG, write_checkpoint
from benchmarks.memory_floor import decode_step_bytes
from model.config import DeepseekV2Config
from model.step import StepMetadata

# profiler op names per category (self time); everything else is "other ops"
WEIGHT_OPS = {
    "aten::addmv_",
    "aten::mv",
    "aten::mm",
    "aten::addmm",
    "aten::_grouped_mm",
    "mkldnn::_linear_pointwise",
    "aten::_mkl_linear",
    "dsv2_cpu::linear",  # model.cpu_ext's few-row products
    "dsv2_cpu::moe",  # and its fused routed experts
}
BATCHED_OPS = {"aten::bmm", "aten::baddbmm"}
ATTENTION_OPS = {
    "aten::_softmax",
    "aten::index_select",
    "aten::index_copy_",
}


def gemv_reader():
    """A closure timing one read of a 64 MB float32 weight (larger than the caches) by a
    one-row product, the fastest weight read torch offers here: the floor's bandwidth is
    its bytes over the best of these, taken between the steps so both see the same load."""
    w = torch.randn(32768, 512)
    x = torch.randn(512)
    torch.mv(w, x)
    return lambda: _timed(lambda: torch.mv(w, x)), w.numel() * w.element_size()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_step(runner, rows: int, context: int):
    """A forward closure for one decode step of ``rows`` rows at ``context`` tokens each."""
    bs = runner.block_size
    nb = -(-context // bs)
    if rows * nb > runner.num_blocks:
        raise SystemExit(f"{rows} rows x {context} tokens do not fit the cache")
    tables = torch.arange(rows * nb).view(rows, nb)  # [B, nb] distinct blocks per row
    lens = torch.full((rows,), context)
    full = context == nb * bs
    step = StepMetadata(
        slot_mapping=tables[:, -1] * bs + (context - 1) % bs,
        max_position=context - 1,
        num_decodes=rows,
        block_tables=tables,
        decode_bias=None if full else runner.decode_bias(lens, nb * bs),
    )
    ids = torch.randint(2, runner.config.vocab_size, (rows,))
    positions = torch.full((rows,), context - 1)

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        return runner.model(ids, positions, step)

    return forward


def profile_shares(forward, steps: int) -> tuple[dict[str, float], int]:
    """Self-time share of each category over ``steps`` profiled forwards, and op calls a step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            forward()
    by_cat: dict[str, float] = defaultdict(float)
    calls = 0
    for ev in prof.key_averages():
        if not ev.key.startswith(("aten::", "mkldnn::", "dsv2_cpu::")):
            continue
        calls += ev.count
        if ev.key in WEIGHT_OPS:
            cat = "weights"
        elif ev.key in BATCHED_OPS:
            cat = "bmm"
        elif ev.key in ATTENTION_OPS:
            cat = "attention rest"
        else:
            cat = "other ops"
        by_cat[cat] += ev.self_cpu_time_total
    total = sum(by_cat.values()) or 1.0
    return {k: v / total for k, v in by_cat.items()}, calls // steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=96, help="tokens each row attends over")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps (best of)")
    ap.add_argument("--small", action="store_true", help="the 6-layer width-384 model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = SMALL_CONFIG if args.small else BENCH_CONFIG

    from services.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), config)
        engine = Engine.from_pretrained(
            Path(tmp), dtype=dtype, max_num_seqs=max(args.rows), enable_prefix_caching=False
        )
    runner = engine.runner
    cfg = DeepseekV2Config.from_dict(config)
    read, read_bytes = gemv_reader()
    print(f"{args.dtype}, {torch.get_num_threads()} thread(s), context {args.context}")
    for rows in args.rows:
        forward = decode_step(runner, rows, args.context)
        for _ in range(3):  # warm up: first calls allocate and pick kernels
            forward()
        # interleaved, best of N each: load from other processes hits both alike
        step_s = read_s = float("inf")
        for _ in range(args.repeats):
            step_s = min(step_s, _timed(forward))
            read_s = min(read_s, read())
        bandwidth = read_bytes / read_s
        shares, calls = profile_shares(forward, 5)
        floor_s = decode_step_bytes(cfg, args.dtype, rows, args.context) / bandwidth
        weights_s = shares.get("weights", 0.0) * step_s
        parts = ", ".join(
            f"{k} {shares.get(k, 0.0) * step_s * 1e3:.2f} ms ({shares.get(k, 0.0):.0%})"
            for k in ("weights", "bmm", "attention rest", "other ops")
        )
        print(
            f"{rows:3d} rows: step {step_s * 1e3:7.2f} ms = {rows / step_s:7.1f} tok/s; "
            f"floor {floor_s * 1e3:6.2f} ms (step at {floor_s / step_s:4.0%} of it); {parts}; "
            f"{calls} aten calls a step (nested included); weight kernels at "
            f"{floor_s / max(weights_s, 1e-9):4.0%} of the floor's bandwidth "
            f"({bandwidth / 1e9:.1f} GB/s, a one-row product over 64 MB in this run)",
            flush=True,
        )


if __name__ == "__main__":
    main()
