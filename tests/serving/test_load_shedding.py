"""Load shedding through Ray Serve's gRPC ingress: past the queue bound, the Engine deployment
answers a free request RESOURCE_EXHAUSTED at once (what the gateway turns into 503 +
Retry-After), still queues internal work, and its metrics port exports queue depth per
priority class and shed requests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from ray import serve
from ray.serve.api import RunTarget

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc
from services.serving.app import build_app
from services.serving.local import LocalServe, free_port
from tests.serving.conftest import SMALL

APP = "dsv2-shed"
MD = (("application", APP),)


@pytest.fixture(scope="module")
def shedding_plane(ray_serve: LocalServe, tiny_checkpoint: Path) -> Iterator[tuple[str, str]]:
    """One Engine replica with the experts in-process, one running sequence at a time, and
    free work shed as soon as anything waits."""
    metrics_port = free_port()
    args = {
        "model_path": str(tiny_checkpoint),
        "model_id": "tiny",
        "num_expert_shards": 0,
        "engine": {"block_size": 8, "max_num_seqs": 1, "max_waiting_requests": 1},
        "engine_deployment": SMALL,
        "metrics_port": metrics_port,
        "metrics_host": "127.0.0.1",
    }
    serve.run_many([RunTarget(target=build_app(args), name=APP, route_prefix=f"/{APP}")])
    try:
        yield ray_serve.grpc_target, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.delete(APP)


def _request(priority: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[3, 4, 5, 6]),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        priority=priority,
    )


def test_free_request_is_resource_exhausted_while_internal_work_queues(shedding_plane):
    target, metrics_url = shedding_plane
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        # An endless internal request holds the only running slot, a second one waits.
        hog = stub.Generate(_request(pb.PRIORITY_INTERNAL, 100_000), metadata=MD, timeout=120)
        next(hog)
        queued = stub.Generate(_request(pb.PRIORITY_INTERNAL, 2), metadata=MD, timeout=120)
        deadline = time.monotonic() + 60
        while stub.Health(pb.HealthRequest(), metadata=MD, timeout=10).waiting_requests < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)

        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(_request(pb.PRIORITY_FREE, 4), metadata=MD, timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in info.value.details()
        assert time.perf_counter() - started < 10  # refused, not queued until a timeout

        metrics = httpx.get(metrics_url, timeout=10).text
        assert 'dsv2_engine_queue_depth{tier="internal"} 1.0' in metrics
        assert 'dsv2_engine_shed_requests_total{tier="free"} 1.0' in metrics

        hog.cancel()  # the queued internal request then runs to its end
        out = list(queued)
        assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
