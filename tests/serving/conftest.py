"""The model plane deployed once per module on the session's local Ray cluster.

Two applications share the cluster: "dsv2" with 4 expert shards and "dsv2-s2" with 2, both on
the tiny checkpoint (group-limited routing, 8 experts in 4 groups). Deploying them together
costs one wait instead of two. (Serve's gRPC proxy only routes to applications that have a
route prefix, hence one each although nothing uses HTTP.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from ray import serve
from ray.serve.api import RunTarget

from services.rpc.dsv2.v1 import inference_pb2_grpc
from services.serving.app import build_app
from services.serving.local import LocalServe

torch.set_num_threads(1)

# Small logical shares: the cluster has 4 logical CPUs over 2 busy cores.
SMALL = {"num_cpus": 0.25, "max_ongoing_requests": 64, "torch_threads": 1}
APPS = {"dsv2": 4, "dsv2-s2": 2}


def app_args(checkpoint: Path, num_shards: int) -> dict:
    return {
        "model_path": str(checkpoint),
        "model_id": "tiny",
        "num_expert_shards": num_shards,
        "engine_replicas": 1,
        "engine": {"block_size": 8, "max_num_seqs": 16},
        "engine_deployment": SMALL,
        "shard_deployment": SMALL,
    }


@pytest.fixture(scope="module")
def model_plane(ray_serve: LocalServe, tiny_checkpoint: Path) -> Iterator[LocalServe]:
    serve.run_many(
        [
            RunTarget(
                target=build_app(app_args(tiny_checkpoint, shards)),
                name=name,
                route_prefix=f"/{name}",
            )
            for name, shards in APPS.items()
        ]
    )
    try:
        yield ray_serve
    finally:
        for name in APPS:
            serve.delete(name)


@pytest.fixture
def stub(model_plane: LocalServe) -> Iterator[inference_pb2_grpc.InferenceStub]:
    """A plain grpcio client of Serve's gRPC ingress."""
    with grpc.insecure_channel(model_plane.grpc_target) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)
