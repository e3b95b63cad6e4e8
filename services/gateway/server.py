"""One process, two ports: the FastAPI app under uvicorn and the grpc.aio server, on one event
loop and sharing one Gateway (Redis pool, backend channel, metrics)."""

from __future__ import annotations

import asyncio
import gc
import logging

import uvicorn

from services.gateway.app import create_app
from services.gateway.backend import ModelBackend
from services.gateway.grpc_service import build_grpc_server, mark_serving
from services.gateway.settings import Settings
from services.gateway.state import Gateway
from services.gateway.tiers import Tier

log = logging.getLogger(__name__)


class GatewayServer:
    def __init__(
        self,
        settings: Settings,
        backend: ModelBackend,
        *,
        tiers: dict[str, Tier] | None = None,
        log_level: str = "warning",
    ) -> None:
        self.settings = settings
        self.gateway = Gateway(settings, backend, tiers=tiers)
        self.app = create_app(gateway=self.gateway)
        self.log_level = log_level
        self.http_port = settings.http_port
        self.grpc_port = settings.grpc_port
        self._uvicorn: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc = None

    async def start(self) -> None:
        s = self.settings
        self._grpc, self.grpc_port = build_grpc_server(self.gateway, f"{s.grpc_host}:{s.grpc_port}")
        await self._grpc.start()
        await mark_serving(self._grpc)
        config = uvicorn.Config(
            self.app,
            host=s.http_host,
            port=s.http_port,
            log_level=self.log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
            access_log=False,
            # X-Forwarded-For is the gateway's call (DSV2_TRUSTED_PROXIES); uvicorn would
            # otherwise believe it from any loopback peer.
            proxy_headers=False,
        )
        self._uvicorn = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._uvicorn.serve())
        while not self._uvicorn.started:
            if self._http_task.done():
                await self._http_task  # raises the startup error
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        sockets = [sock for srv in self._uvicorn.servers for sock in srv.sockets]
        if sockets:
            self.http_port = sockets[0].getsockname()[1]
        log.info(
            "gateway: HTTP on %s:%d, gRPC on %s:%d",
            s.http_host,
            self.http_port,
            s.grpc_host,
            self.grpc_port,
        )

    async def wait(self) -> None:
        """Until the HTTP server exits (SIGINT/SIGTERM when run in the main thread)."""
        if self._http_task is not None:
            await self._http_task

    async def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._http_task is not None:
            await self._http_task
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        await self.gateway.close()

    async def serve(self) -> None:
        await self.start()
        freeze_startup_objects()
        try:
            await self.wait()
        finally:
            await self.stop()


def freeze_startup_objects() -> None:
    """Take what startup built (FastAPI, pydantic, gRPC, protobuf, the app) out of the cyclic
    garbage collector's sight: its full passes otherwise walk ~100k long-lived objects and
    stall the event loop for tens of ms, which shows in the p99. For a serving process only
    (tests build many gateways in one process and should not pin their objects)."""
    gc.collect()
    gc.freeze()
