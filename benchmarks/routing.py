"""Prefix-cache-aware routing vs Ray Serve's default router: 2 Engine replicas, concurrent
two-turn chats through Serve's gRPC ingress, one run.

Each chat sends a long first turn, then a second turn that repeats the first turn's prompt and
reply and adds a short question (what a chat client sends); all first turns go at once, then
all second turns. Where the second turn lands on the
replica that served the first, its prompt is mostly a prefix-cache hit and its time to first
token (TTFT) is a short prefill. The same chats run once per router, each on a fresh
application (empty caches), one after the other on the same local Ray cluster. Prints, per
router, the second turns' cache hit rate (cached / prompt tokens) and median / p90 TTFT, then
the ratios.

The model is the small random DeepSeek-V2 of benchmarks/bench_checkpoint.py (6 layers, width
384); prompts are token ids, so no tokenizer is needed. Keep the machine otherwise idle.

    python benchmarks/routing.py [--chats 20] [--prompt-tokens 384] [--question-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from benchmarks.bench_checkpoint import SMALL_CONFIG, random_prompts, write_checkpoint  # noqa: E402


@dataclass
class TurnResult:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    output: list[int]


async def _turn(stub, app: str, session: str, ids: list[int], max_tokens: int) -> TurnResult:
    from services.rpc.dsv2.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(
        session_id=session,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    ttft, output, last = None, [], None
    async for response in stub.Generate(request, metadata=(("application", app),), timeout=600):
        if response.token_ids and ttft is None:
            ttft = time.perf_counter() - start
        output.extend(response.token_ids)
        last = response
    assert last is not None and ttft is not None and not last.error, last
    return TurnResult(ttft, last.usage.prompt_tokens, last.usage.cached_prompt_tokens, output)


async def run_chats(target: str, app: str, prompts, questions, new_tokens: int) -> list[TurnResult]:
    """All first turns at once, then all second turns at once (each chat's second turn
    repeats its first prompt and reply): the second turns' results."""
    import grpc

    from services.rpc.dsv2.v1 import inference_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        firsts = await asyncio.gather(
            *(_turn(stub, app, f"chat-{i}", p, new_tokens) for i, p in enumerate(prompts))
        )
        return await asyncio.gather(
            *(
                _turn(stub, app, f"chat-{i}", p + first.output + q, new_tokens)
                for i, (p, q, first) in enumerate(zip(prompts, questions, firsts, strict=True))
            )
        )


def summarize(name: str, seconds: list[TurnResult]) -> dict[str, float]:
    ttfts = sorted(r.ttft_s for r in seconds)
    hit = sum(r.cached_tokens for r in seconds) / sum(r.prompt_tokens for r in seconds)
    # A hit: all of the first turn's prompt came from the cache (block-rounded).
    hits = sum(1 for r in seconds if r.cached_tokens >= 0.8 * r.prompt_tokens)
    row = {
        "hit_rate": hit,
        "hits": hits,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))],
        "ttft_mean_ms": 1000 * statistics.fmean(ttfts),
    }
    print(
        f"{name:16s} second turns: cache hit rate {row['hit_rate']:6.1%} ({hits}/{len(seconds)} "
        f"turns found their chat cached)  TTFT p50 "
        f"{row['ttft_p50_ms']:7.1f} ms  p90 {row['ttft_p90_ms']:7.1f} ms  mean "
        f"{row['ttft_mean_ms']:7.1f} ms",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-imbalance", type=int, default=4)
    args = ap.parse_args()

    from ray import serve

    from services.serving.app import build_app
    from services.serving.local import free_port, start_local_serve, stop_local_serve

    prompts = random_prompts(args.chats, args.prompt_tokens, seed=1)
    questions = random_prompts(args.chats, args.question_tokens, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        params = write_checkpoint(path, SMALL_CONFIG)
        print(
            f"model {params / 1e6:.0f}M parameters, {args.replicas} Engine replicas (1 thread "
            f"each), {args.chats} chats × 2 turns, prompts {args.prompt_tokens} + "
            f"{args.new_tokens} + {args.question_tokens} tokens",
            flush=True,
        )
        info = start_local_serve(num_cpus=4, grpc_port=free_port(), http_port=free_port())
        rows = {}
        try:
            for policy in ("default", "prefix_affinity"):
                app = f"route-{policy.replace('_', '-')}"
                config = {
                    "model_path": str(path),
                    "num_expert_shards": 0,
                    "engine_replicas": args.replicas,
                    "engine": {"block_size": 16, "max_num_seqs": 32},
                    "engine_deployment": {
                        "num_cpus": 0.5,
                        "max_ongoing_requests": 64,
                        "torch_threads": 1,
                    },
                    "routing": {"policy": policy, "max_imbalance": args.max_imbalance},
                }
                serve.run(build_app(config), name=app, route_prefix=f"/{app}")
                try:
                    seconds = asyncio.run(
                        run_chats(info.grpc_target, app, prompts, questions, args.new_tokens)
                    )
                finally:
                    serve.delete(app)
                rows[policy] = summarize(policy, seconds)
        finally:
            stop_local_serve()
    ours, peer = rows["prefix_affinity"], rows["default"]
    print(
        f"prefix_affinity / default: hit rate {ours['hit_rate']:.1%} vs {peer['hit_rate']:.1%}; "
        f"TTFT p50 ×{ours['ttft_p50_ms'] / peer['ttft_p50_ms']:.2f}, "
        f"p90 ×{ours['ttft_p90_ms'] / peer['ttft_p90_ms']:.2f}, "
        f"mean ×{ours['ttft_mean_ms'] / peer['ttft_mean_ms']:.2f} (below 1: faster)"
    )


if __name__ == "__main__":
    main()
