"""A local Ray cluster bound to 127.0.0.1 with Serve's proxies pinned (CLI, tests, launcher).

Facts behind the settings: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray picks the machine's
outward address; Ray's default object store reserves 30% of RAM; Serve's HTTP proxy starts
even when unused, so it is pinned to loopback too.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from services.serving.config import APP_NAME, INFERENCE_SERVICER

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LocalServe:
    grpc_port: int
    http_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def start_local_serve(
    *,
    num_cpus: float = 2,
    grpc_port: int = 9000,
    http_port: int = 8001,
    object_store_bytes: int = 256 << 20,
) -> LocalServe:
    """ray.init on 127.0.0.1 plus serve.start with the Inference gRPC ingress."""
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray import serve

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_bytes,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=False,
    )
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [INFERENCE_SERVICER]},
    )
    return LocalServe(grpc_port=grpc_port, http_port=http_port)


def stop_local_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def reserve_local_gpu(config: dict[str, Any]) -> dict[str, Any]:
    """A local run's config with one GPU reserved for the Engine deployment when the engine
    should run on CUDA (``engine.device`` cuda/cuda:N, or auto with a GPU visible here) and
    the config reserves none itself: Ray hides GPUs from replicas that reserve none, so
    ``auto`` would otherwise land on the CPU of a GPU machine."""
    device = str((config.get("engine") or {}).get("device", "auto"))
    deployment = dict(config.get("engine_deployment") or {})
    if "num_gpus" in deployment:
        return config
    wants_cuda = device.startswith("cuda")
    if device == "auto":
        import torch

        wants_cuda = torch.cuda.is_available()
    if not wants_cuda:
        return config
    return {**config, "engine_deployment": {**deployment, "num_gpus": 1}}


def run_model_plane(config: dict[str, Any], name: str = APP_NAME) -> None:
    """Deploy the model plane app and wait until it is running.

    The route prefix matters although nothing uses HTTP: Serve's gRPC proxy answers NOT_FOUND
    for an application deployed with route_prefix=None.
    """
    from ray import serve

    from services.serving.app import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
