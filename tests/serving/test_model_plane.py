"""The model plane on a real local Ray cluster: Serve's gRPC ingress, expert shards over gRPC.

Clients are plain grpcio stubs sending metadata ("application", <app>), as the gateway does.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import ray
from ray import serve

import model
from services.engine import Engine, SamplingParams
from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc
from tests.experts.greedy import MIXED_MAX_TOKENS, MIXED_PROMPTS, assert_same_up_to_ties
from tests.serving.conftest import APPS


def _md(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


def _greedy(ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def _collect(stub, request: pb.GenerateRequest, app: str, timeout: float = 60):
    """(token ids, responses) of one streamed Generate."""
    responses = list(stub.Generate(request, metadata=_md(app), timeout=timeout))
    return [t for r in responses for t in r.token_ids], responses


@pytest.fixture(scope="module")
def in_process_outputs(tiny_checkpoint: Path) -> list[list[int]]:
    engine = Engine.from_pretrained(tiny_checkpoint, block_size=8)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MIXED_MAX_TOKENS
    ]
    return [o.token_ids for o in engine.generate(MIXED_PROMPTS, params)]


@pytest.fixture(scope="module")
def full_model(tiny_checkpoint: Path):
    return model.load_pretrained(tiny_checkpoint).eval()


def test_streaming_generate_through_serve_grpc_ingress(stub):
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=_md("dsv2"), timeout=10)
    assert (info.model_id, info.num_expert_shards, info.dtype) == ("tiny", 4, "float32")
    request = pb.GenerateRequest(
        request_id="stream-1",
        text="Hello, world!",
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
    )
    tokens, responses = _collect(stub, request, "dsv2")
    assert len(responses) >= 6  # streamed: a message per step, not one at the end
    assert len(tokens) == 6
    final = responses[-1]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and not final.error
    assert final.usage.completion_tokens == 6 and final.usage.prompt_tokens > 0
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_bad_request_gets_invalid_argument(stub):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=pb.SamplingParams())
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, metadata=_md("dsv2"), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in info.value.details()


@pytest.mark.parametrize("app", list(APPS))
def test_greedy_batch_matches_in_process_engine(app, stub, in_process_outputs, full_model):
    """A batch of mixed concurrent requests through S shards == the in-process engine."""
    with ThreadPoolExecutor(len(MIXED_PROMPTS)) as pool:
        results = list(
            pool.map(
                lambda job: _collect(stub, _greedy(*job), app)[0],
                zip(MIXED_PROMPTS, MIXED_MAX_TOKENS, strict=True),
            )
        )
    assert [len(r) for r in results] == MIXED_MAX_TOKENS
    assert_same_up_to_ties(full_model, MIXED_PROMPTS, in_process_outputs, results)


def test_group_limited_routing_sends_no_token_to_more_than_two_shards(stub, model_plane):
    """n_group 4, topk_group 2, 4 shards: counted by the engine replica's expert client."""
    _collect(stub, _greedy(MIXED_PROMPTS[3], 10), "dsv2")
    traffic = serve.get_app_handle("dsv2").expert_traffic.remote().result(timeout_s=30)
    reached = traffic["shards_per_token"]  # [0 shards, 1 shard, 2, 3, 4]
    assert sum(reached) > 0 and len(reached) == 5
    assert reached[3] == reached[4] == 0
    assert traffic["max_shards_per_token"] <= 2
    assert all(n > 0 for n in traffic["bytes_sent"])
    # The same counters, as prometheus metrics of the engine replica.
    metrics = httpx.get(model_plane.metrics_url, timeout=10).text
    assert 'dsv2_expert_tokens_total{expert="0",layer="1"}' in metrics
    assert 'dsv2_expert_token_dispatches_total{shards="3"} 0.0' in metrics


def test_health_reports_every_shard(stub):
    health = stub.Health(pb.HealthRequest(), metadata=_md("dsv2"), timeout=10)
    assert health.serving
    assert [s.shard for s in health.shards] == [0, 1, 2, 3]
    assert all(s.serving and s.address.startswith("127.0.0.1:") for s in health.shards)


def _replica_actor(app: str, deployment: str):
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] == "serve" and f"{app}#{deployment}#" in name:
            return ray.get_actor(name, namespace="serve")
    raise AssertionError(f"no replica of {app}/{deployment}")


def test_killing_a_shard_ends_in_flight_requests_and_serve_recovers(model_plane):
    app = "dsv2-s2"
    with grpc.insecure_channel(model_plane.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streams = [
            stub.Generate(_greedy(p, 1900), metadata=_md(app), timeout=120)
            for p in MIXED_PROMPTS[:4]
        ]
        # Every request is generating before the kill.
        firsts = [next(s) for s in streams]
        assert all(f.finish_reason == pb.FINISH_REASON_UNSPECIFIED for f in firsts)

        ray.kill(_replica_actor(app, "ExpertShard1"), no_restart=True)
        killed = time.monotonic()

        # Meanwhile Health says so. Asked from the kill on, not after the requests drain: Serve
        # may already have a replacement up by then (a new process, torch, weights: seconds),
        # and a run once found the plane healthy again.
        def health_now() -> pb.HealthResponse | None:
            try:
                return stub.Health(pb.HealthRequest(), metadata=_md(app), timeout=10)
            except grpc.RpcError as exc:
                # Serve's gRPC proxy itself can fail a unary call with INTERNAL in the instant a
                # replica of the app dies (ObjectRefStreamEndOfStreamError in the proxy's log,
                # seen once in a clean-clone run): no answer from the Engine, so ask again.
                if exc.code() != grpc.StatusCode.INTERNAL:
                    raise
                return None

        while (health := health_now()) is None or health.serving:
            assert time.monotonic() - killed < 10, "Health still said serving 10 s after the kill"
            time.sleep(0.05)
        assert [s.serving for s in health.shards] == [True, False]
        assert health.shards[1].detail

        def drain(stream) -> tuple[pb.GenerateResponse | None, float, str]:
            last = None
            try:
                for last in stream:  # noqa: B007
                    pass
                return last, time.monotonic() - killed, ""
            except grpc.RpcError as exc:  # an error status also ends the request
                return last, time.monotonic() - killed, f"{exc.code()}: {exc.details()}"

        with ThreadPoolExecutor(len(streams)) as pool:
            ended = list(pool.map(drain, streams))
        for last, after, status in ended:
            assert after < 10, f"request ended {after:.1f} s after the kill"
            if not status:
                assert last is not None and last.finish_reason == pb.FINISH_REASON_ABORT
                assert "expert shard" in last.error
                assert last.usage.completion_tokens < 1900

        # Serve replaces the replica; new requests succeed again once it is back.
        deadline = time.monotonic() + 120
        while True:
            try:
                tokens, responses = _collect(stub, _greedy(MIXED_PROMPTS[0], 4), app, 30)
                if responses[-1].finish_reason == pb.FINISH_REASON_LENGTH:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the model plane did not recover"
            time.sleep(1)
        assert len(tokens) == 4
        health = stub.Health(pb.HealthRequest(), metadata=_md(app), timeout=10)
        assert health.serving and all(s.serving for s in health.shards)
