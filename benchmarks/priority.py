"""Tier priority and load shedding under a free-tier flood, against plain first come first
served, in one run.

The model plane's API (InferenceService over one AsyncEngine, in this process) on the small
random DeepSeek-V2 of bench_checkpoint.py, with distinct `--prompt-len`-token prompts (256: a
chat's system prompt and history; no prefix-cache hits). First the engine's capacity is measured (a full
batch of free requests), then pro requests are sent to the idle engine one at a time: their
median time to first token (TTFT) is the reference. Then two floods, each of free requests
arriving at `--overload` times that capacity, while pro requests are sent one at a time. Times
are in units of the measured batch time B (one full batch of free requests start to end), so
the run means the same on a fast or a slow CPU: the flood lasts `--flood-batches` B, and a free
client gives up (a timeout) after `--deadline-batches` B:

- priority: the engine as configured for production: pro admitted ahead of free (and given a
  slot by preempting free work when the batch is full), free refused at once (Overloaded,
  the gateway's 503 + Retry-After) while `--max-waiting` requests wait (default: one batch,
  about one B of waiting);
- fcfs: the same engine without classes or bound: every request as free, no shedding.

Prints per mode the pro TTFT (median and worst) and its ratio to the idle one, and what became
of the free requests (served, shed at once, timed out). Target: pro TTFT under the flood
within 2x of the idle engine's with priority, and free requests shed rather than timing out.

The figures only mean something on a quiet machine (DESIGN.md, benchmark hygiene): one torch
thread by default, the event loop and the step thread share the rest.

    python benchmarks/priority.py [--threads 1] [--flood-batches 8] [--overload 2.5]
                                  [--max-num-seqs 8] [--max-waiting 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from benchmarks.bench_checkpoint import SMALL_CONFIG, random_prompts, write_checkpoint
from services.engine import AsyncEngine, Engine, InferenceService, Overloaded
from services.rpc.dsv2.v1 import inference_pb2 as pb

TTFT_TARGET = 2.0  # pro TTFT under the flood over the idle engine's, with priority


@dataclass
class FloodResult:
    pro_ttft_s: list[float] = field(default_factory=list)
    served: int = 0
    shed: int = 0
    timed_out: int = 0

    @property
    def sent(self) -> int:
        return self.served + self.shed + self.timed_out


class Load:
    """Requests of one kind against one InferenceService; distinct prompts (no cache hits)."""

    def __init__(self, service: InferenceService, prompt_len: int, seed: int) -> None:
        self.service = service
        self.prompts = iter(random_prompts(10_000, prompt_len, seed=seed))

    def request(self, priority: int, max_tokens: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=next(self.prompts)),
            sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            priority=priority,
        )

    async def ttft(self, priority: int, max_tokens: int) -> float:
        """Seconds from sending to the first generated token; the rest is read to the end."""
        start = time.perf_counter()
        first = None
        async for resp in self.service.generate(self.request(priority, max_tokens)):
            if first is None and resp.token_ids:
                first = time.perf_counter() - start
        assert first is not None
        return first

    async def complete(self, priority: int, max_tokens: int) -> None:
        async for _ in self.service.generate(self.request(priority, max_tokens)):
            pass


def build(checkpoint: Path, args: argparse.Namespace, *, priority: bool) -> InferenceService:
    options = dict(max_num_seqs=args.max_num_seqs, block_size=16)
    if priority:
        options["max_waiting_requests"] = args.max_waiting
    else:  # the peer: nothing shed, and every request is sent as free (one class)
        options["shed_priorities"] = []
    engine = Engine.from_pretrained(checkpoint, dtype="float32", device="cpu", **options)
    async_engine = AsyncEngine(engine)
    return InferenceService(async_engine, engine.tokenizer, "bench")


async def batch_time(load: Load, args: argparse.Namespace) -> float:
    """Seconds for one full batch of free requests, start to end."""
    start = time.perf_counter()
    n = args.max_num_seqs
    await asyncio.gather(*(load.complete(pb.PRIORITY_FREE, args.free_tokens) for _ in range(n)))
    return time.perf_counter() - start


async def idle_ttft(load: Load, args: argparse.Namespace) -> list[float]:
    return [await load.ttft(pb.PRIORITY_PRO, args.pro_tokens) for _ in range(args.pro_requests)]


async def flood(
    load: Load, args: argparse.Namespace, rate: float, *, priority: bool
) -> FloodResult:
    result = FloodResult()
    pro_class = pb.PRIORITY_PRO if priority else pb.PRIORITY_FREE

    async def free_client() -> None:
        try:
            await asyncio.wait_for(
                load.complete(pb.PRIORITY_FREE, args.free_tokens), args.deadline_s
            )
            result.served += 1
        except Overloaded:
            result.shed += 1
        except TimeoutError:
            result.timed_out += 1

    pro_done = asyncio.Event()

    async def arrivals() -> None:
        """Free requests at `rate` for flood_s, and on until every pro request has its first
        token, so each one meets a flooded engine."""
        clients = []
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter() - start) < args.flood_s or not pro_done.is_set():
            due = int(now * rate) + 1
            for _ in range(due - sent):
                clients.append(asyncio.create_task(free_client()))
            sent = due
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*clients)

    async def one_pro(delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        result.pro_ttft_s.append(await load.ttft(pro_class, args.pro_tokens))

    async def pro_requests() -> None:
        # Sent at fixed times, not one after another's end: a pro request stuck in the queue
        # must not push the next ones past the flood. The first third fills the queue.
        gap = (args.flood_s / 2) / args.pro_requests
        start = args.flood_s / 3
        await asyncio.gather(*(one_pro(start + i * gap) for i in range(args.pro_requests)))
        pro_done.set()

    await asyncio.gather(arrivals(), pro_requests())
    return result


def report(name: str, idle: float, r: FloodResult) -> float:
    med, worst = statistics.median(r.pro_ttft_s), max(r.pro_ttft_s)
    ratio = med / idle
    print(
        f"{name:9s} pro TTFT median {med * 1000:8.1f} ms  worst {worst * 1000:8.1f} ms  "
        f"{ratio:6.2f}x idle | free sent {r.sent:4d}: served {r.served:4d}, "
        f"shed {r.shed:4d}, timed out {r.timed_out:4d}"
    )
    return ratio


async def main_async(args: argparse.Namespace, checkpoint: Path) -> int:
    with_priority = build(checkpoint, args, priority=True)
    fcfs = build(checkpoint, args, priority=False)
    try:
        load = Load(with_priority, args.prompt_len, seed=1)
        await load.complete(pb.PRIORITY_PRO, 4)  # warm up
        # best of two: a busy machine only ever makes a batch slower, and an underestimated
        # capacity would make the flood too light to matter
        batch_s = min([await batch_time(load, args) for _ in range(2)])
        rate = args.max_num_seqs / batch_s * args.overload
        args.flood_s = args.flood_batches * batch_s
        args.deadline_s = args.deadline_batches * batch_s
        idle = statistics.median(await idle_ttft(load, args))
        print(
            f"batch time {batch_s:.2f} s ({args.max_num_seqs} free requests of "
            f"{args.free_tokens} new tokens); flood {rate:.1f} requests/s for {args.flood_s:.1f} s, "
            f"clients give up after {args.deadline_s:.1f} s; bound {args.max_waiting} waiting"
        )
        print(f"idle      pro TTFT median {idle * 1000:8.1f} ms")
        ratio = report("priority", idle, await flood(load, args, rate, priority=True))
        fcfs_load = Load(fcfs, args.prompt_len, seed=2)
        await fcfs_load.complete(pb.PRIORITY_FREE, 4)
        fcfs_result = await flood(fcfs_load, args, rate, priority=False)
        report("fcfs", idle, fcfs_result)
    finally:
        with_priority.engine.close()
        fcfs.engine.close()
    ok = ratio <= TTFT_TARGET
    print(
        f"pro TTFT under the flood {ratio:.2f}x idle (target <= {TTFT_TARGET:g}x): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-waiting", type=int, help="shedding bound (default: --max-num-seqs)")
    # Chat prompts carry a system prompt and history: hundreds of tokens. (With very short
    # prompts an idle first token is one tiny step, and under load the step already running
    # weighs more than that: 32 tokens read about 2.3x on an idle machine.)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--free-tokens", type=int, default=24, help="new tokens per free request")
    p.add_argument("--pro-tokens", type=int, default=8, help="new tokens per pro request")
    p.add_argument("--pro-requests", type=int, default=6)
    p.add_argument("--flood-batches", type=float, default=8.0, help="flood length, in batch times")
    p.add_argument("--overload", type=float, default=2.5, help="arrival rate over capacity")
    p.add_argument(
        "--deadline-batches",
        type=float,
        default=4.0,
        help="a free client's timeout, in batch times",
    )
    args = p.parse_args()
    if args.max_waiting is None:
        args.max_waiting = args.max_num_seqs
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        params = write_checkpoint(checkpoint, SMALL_CONFIG)
        print(f"random DeepSeek-V2 {params / 1e6:.0f}M parameters, {args.threads} torch thread(s)")
        return asyncio.run(main_async(args, checkpoint))


if __name__ == "__main__":
    sys.exit(main())
