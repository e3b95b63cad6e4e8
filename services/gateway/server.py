"""One process, two ports: the FastAPI app under uvicorn and the grpc.aio server, on one event
loop and sharing one Gateway (Redis pool, backend channel, metrics).

SIGTERM / Ctrl-C drain the gateway (drain.py) before anything closes: new requests get 503,
running streams get Settings.drain_grace_s to finish, then a final "server restarting" error.
A second signal cuts the grace short. uvicorn's own signal handling is off: it (and
sse-starlette's hook on it) would end streams at once, mid-reply."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator

import uvicorn

from services.gateway.backends.model_plane import ModelBackend
from services.gateway.core.tiers import Tier
from services.gateway.grpc_api.service import build_grpc_server, mark_serving
from services.gateway.http.app import create_app
from services.gateway.settings import Settings
from services.gateway.state import Gateway

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its SIGINT/SIGTERM handlers; GatewayServer handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self._stop_requested = asyncio.Event()
        self._stopped = False

    async def start(self) -> None:
        s = self.settings
        self._grpc, self.grpc_port = build_grpc_server(self.gateway, f"{s.grpc_host}:{s.grpc_port}")
        await self._grpc.start()
        await mark_serving(self._grpc)
        grpc_server = self._grpc
        self.gateway.drain_state.on_begin.append(lambda: mark_serving(grpc_server, False))
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
        self._uvicorn = _Uvicorn(config)
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

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM: the first asks for a stop (wait() returns), a later one cuts the
        drain's grace short. Main thread only."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        if self._stop_requested.is_set():
            self.gateway.drain_state.cut_short()
        self._stop_requested.set()

    async def wait(self) -> None:
        """Until a stop is requested or the HTTP server exits by itself."""
        waiters = [asyncio.ensure_future(self._stop_requested.wait())]
        if self._http_task is not None:
            waiters.append(self._http_task)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiters[0].cancel()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain (new requests 503; running streams get `grace_s`, default
        Settings.drain_grace_s, then a final error), then close both servers and the
        gateway's connections."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        stopped = await self.gateway.drain_state.run(grace)
        if stopped:
            log.warning("gateway: %d stream(s) ended with 'server restarting'", stopped)
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
        self.install_signal_handlers()
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
