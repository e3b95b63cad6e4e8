"""Routed experts on 2 gRPC expert shards vs in-process, same checkpoint, 16 concurrent requests.

The checkpoint is the ~100M-parameter random DeepSeek-V2 of DESIGN's peer measurements (hidden
512, 8 layers, 32 routed experts top-4). The shards are separate processes on 127.0.0.1 (as
Ray Serve replicas would be); both engines run in this process, one after the other, with the
same torch thread count. Prints both throughputs, the ratio (target >= 0.5 on 2 cores) and
the bytes sent to the shards per generated token.

Every process runs one torch thread by default: on a shared 2-core machine, two intra-op
threads per process stall on descheduled peers (measured here: the in-process engine fell
from 109 to 19 tok/s going from 1 to 2 threads under load), which would flatter the shards.

    python benchmarks/distributed_overhead.py [--threads 1] [--new-tokens 64] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from benchmarks.bench_checkpoint import (  # noqa: E402
    random_prompts,
    timed_generate,
    write_checkpoint,
)


def start_shards(
    path: Path, num_shards: int, threads: int
) -> tuple[list[subprocess.Popen], list[str]]:
    procs, addresses = [], []
    for k in range(num_shards):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.experts",
                "--model",
                str(path),
                "--shard",
                str(k),
                "--num-shards",
                str(num_shards),
                "--threads",
                str(threads),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"expert shard failed to start: {line!r}")
        addresses.append(line.split()[-1])
    return procs, addresses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    ap.add_argument("--shard-threads", type=int, default=1, help="torch threads per shard")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from services.engine import Engine
    from services.experts import RemoteExpertExecutor

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        n_params = write_checkpoint(path)
        procs, addresses = start_shards(path, args.shards, args.shard_threads)
        try:
            local = Engine.from_pretrained(
                path, max_num_seqs=args.concurrency, enable_prefix_caching=False
            )
            executor = RemoteExpertExecutor.for_checkpoint(
                str(path), args.shards, targets=addresses
            )
            executor.connect(timeout=60)
            remote = Engine.from_pretrained(
                path,
                experts="none",
                expert_executor=executor,
                max_num_seqs=args.concurrency,
                enable_prefix_caching=False,
            )
            print(
                f"model: random DeepSeek-V2, {n_params / 1e6:.0f}M parameters, fp32; engine "
                f"{args.threads} threads, {args.shards} shards x {args.shard_threads} threads"
            )
            prompts = random_prompts(args.concurrency, args.prompt_tokens)
            n = args.new_tokens
            timed_generate(local, prompts[:2], 4)  # warm up both
            timed_generate(remote, prompts[:2], 4)

            # Interleaved, best of N each: a busy machine slows both alike.
            local_runs, remote_runs = [], []
            for _ in range(args.repeats):
                local_runs.append(timed_generate(local, prompts, n))
                sent = executor.traffic.total_bytes_sent
                t, out = timed_generate(remote, prompts, n)
                remote_runs.append((t, out, executor.traffic.total_bytes_sent - sent))
            local_t, local_out = min(local_runs, key=lambda r: r[0])
            remote_t, remote_out, sent_bytes = min(remote_runs, key=lambda r: r[0])
            tokens = len(prompts) * n
            local_tps, remote_tps = tokens / local_t, tokens / remote_t
            same = sum(a == b for a, b in zip(local_out, remote_out, strict=True))
            print(
                f"{args.concurrency} concurrent requests, {args.prompt_tokens}-token prompts, {n} new tokens each"
            )
            print(f"  in-process experts : {local_tps:8.1f} tok/s")
            print(f"  {args.shards} gRPC shards     : {remote_tps:8.1f} tok/s")
            print(f"  ratio              : {remote_tps / local_tps:8.2f}   (target >= 0.5)")
            print(f"  bytes sent / token : {sent_bytes / tokens:8.0f}   (prefill included)")
            print(f"  greedy outputs equal to in-process: {same}/{len(prompts)}")
            executor.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
