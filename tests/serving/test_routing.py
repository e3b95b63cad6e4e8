"""Prefix-cache-aware routing on a real local Ray cluster, through Serve's gRPC ingress.

One application with 2 Engine replicas (experts in-process) and PrefixAffinityRouter with a
load bound of 1 request. Which replica served a turn shows in what a client sees: a turn that
lands where its conversation is cached reports most of its prompt as cached_prompt_tokens; on
the other replica only the chat template's opening can be cached (shared by all prompts).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ray import serve

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc
from services.serving.app import build_app
from services.serving.local import LocalServe
from tests.serving.conftest import SMALL

APP = "dsv2-route"
MD = (("application", APP),)
BLOCK = 8


@pytest.fixture(scope="module")
def stub(
    ray_serve: LocalServe, tiny_checkpoint: Path
) -> Iterator[inference_pb2_grpc.InferenceStub]:
    args = {
        "model_path": str(tiny_checkpoint),
        "model_id": "tiny",
        "num_expert_shards": 0,
        "engine_replicas": 2,
        "engine": {"block_size": BLOCK, "max_num_seqs": 16},
        "engine_deployment": SMALL,
        "routing": {"policy": "prefix_affinity", "max_imbalance": 1},
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        with grpc.insecure_channel(ray_serve.grpc_target) as channel:
            yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        serve.delete(APP)


def _turn(session: str, contents: list[str], max_tokens: int = 4) -> pb.GenerateRequest:
    roles = ["user", "assistant"] * len(contents)
    return pb.GenerateRequest(
        session_id=session,
        messages=pb.ChatMessages(
            messages=[
                pb.ChatMessage(role=r, content=c) for r, c in zip(roles, contents, strict=False)
            ]
        ),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def _usage(stub, request: pb.GenerateRequest) -> pb.Usage:
    responses = list(stub.Generate(request, metadata=MD, timeout=120))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH, responses[-1].error
    return responses[-1].usage


def _opening(i: int) -> str:
    # Long and unique per chat, so its blocks are cached nowhere else.
    return f"chat {i}: " + " ".join(f"w{i}x{j}" for j in range(12))


def test_second_turns_land_where_the_first_turn_is_cached(stub):
    firsts, seconds = [], []
    for i in range(6):  # by chance alone, 6 of 6 on the right one of 2 replicas: 1 in 64
        first = _usage(stub, _turn(f"stick-{i}", [_opening(i)]))
        second = _usage(stub, _turn(f"stick-{i}", [_opening(i), "ok", "and then?"]))
        firsts.append(first.prompt_tokens)
        seconds.append(second.cached_prompt_tokens)
    for prompt, cached in zip(firsts, seconds, strict=True):
        assert cached >= prompt - BLOCK, (firsts, seconds)  # all but the last partial block


def test_over_the_load_bound_a_turn_goes_to_the_least_loaded_replica(stub):
    session = "bound-1"
    first = _usage(stub, _turn(session, [_opening(100)]))
    # Two long generations of the same session pile onto its replica (within the bound of 1
    # when each was routed): that replica now carries 2 more requests than the other.
    started = [threading.Event(), threading.Event()]
    calls = []

    def run(k: int) -> None:
        call = stub.Generate(
            _turn(session, [_opening(100), "ok", f"long {k}"], max_tokens=1500),
            metadata=MD,
            timeout=120,
        )
        calls.append(call)
        try:
            for _ in call:
                started[k].set()
        except grpc.RpcError:
            pass  # cancelled below

    threads = []
    for k in range(2):
        t = threading.Thread(target=run, args=(k,), daemon=True)
        t.start()
        threads.append(t)
        assert started[k].wait(60)  # streaming: it was routed
    try:
        over = _usage(stub, _turn(session, [_opening(100), "ok", "short one"]))
    finally:
        for call in calls:
            call.cancel()
        for t in threads:
            t.join(30)
    assert first.prompt_tokens > 4 * BLOCK
    # Not the session's replica: only the template's opening (< 2 blocks) could be cached.
    assert over.cached_prompt_tokens < 2 * BLOCK, (first, over)
    # Load gone, the session's turns are routed by their cached prefix again.
    again = _usage(stub, _turn(session, [_opening(100), "ok", "short two"]))
    assert again.cached_prompt_tokens >= first.prompt_tokens - BLOCK
