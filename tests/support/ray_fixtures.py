"""One local Ray cluster (127.0.0.1 only) with Serve per test session, for every test folder.

Ray start/stop costs ~15 s on these machines, so tests share this cluster (and, where they
can, one Serve application). The gRPC ingress and the unused HTTP proxy get free ports.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.serving.local import LocalServe, free_port, start_local_serve, stop_local_serve


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[LocalServe]:
    """A running Ray cluster + Serve; `.grpc_target` is Serve's gRPC ingress (Inference)."""
    # A few more logical CPUs than cores: deployments declare fractions, the OS shares cores.
    serve_info = start_local_serve(num_cpus=4, grpc_port=free_port(), http_port=free_port())
    try:
        yield serve_info
    finally:
        stop_local_serve()
