"""The model plane deployed once per module on the session's local Ray cluster.

Two applications share the cluster: "dsv2" with 4 expert shards and "dsv2-s2" with 2, both on
the tiny checkpoint (group-limited routing, 8 experts in 4 groups). Deploying them together
costs one wait instead of two. (Serve's gRPC proxy only routes to applications that have a
route prefix, hence one each although nothing uses HTTP.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from ray import serve
from ray.serve.api import RunTarget

from services.rpc.dsv2.v1 import inference_pb2_grpc
from services.serving.app import build_app
from services.serving.local import LocalServe, free_port

torch.set_num_threads(1)

# Small logical shares: the cluster has 4 logical CPUs over 2 busy cores.
SMALL = {"num_cpus": 0.25, "max_ongoing_requests": 64, "torch_threads": 1}
APPS = {"dsv2": 4, "dsv2-s2": 2}


def app_args(checkpoint: Path, num_shards: int, metrics_port: int | None = None) -> dict:
    return {
        "model_path": str(checkpoint),
        "model_id": "tiny",
        "num_expert_shards": num_shards,
        "engine_replicas": 1,
        "engine": {"block_size": 8, "max_num_seqs": 16},
        "engine_deployment": SMALL,
        "shard_deployment": SMALL,
        "metrics_port": metrics_port,
        "metrics_host": "127.0.0.1",
    }


@dataclass(frozen=True)
class ModelPlane:
    grpc_target: str  # Serve's gRPC ingress
    metrics_url: str  # prometheus endpoint of the "dsv2" engine replica


@pytest.fixture(scope="module")
def model_plane(ray_serve: LocalServe, tiny_checkpoint: Path) -> Iterator[ModelPlane]:
    metrics_port = free_port()
    targets = [
        RunTarget(
            target=build_app(
                app_args(tiny_checkpoint, shards, metrics_port if name == "dsv2" else None)
            ),
            name=name,
            route_prefix=f"/{name}",
        )
        for name, shards in APPS.items()
    ]
    serve.run_many(targets)
    try:
        yield ModelPlane(ray_serve.grpc_target, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        for name in APPS:
            serve.delete(name)


@pytest.fixture
def stub(model_plane: ModelPlane) -> Iterator[inference_pb2_grpc.InferenceStub]:
    """A plain grpcio client of Serve's gRPC ingress."""
    with grpc.insecure_channel(model_plane.grpc_target) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)
