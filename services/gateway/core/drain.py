"""Graceful drain on SIGTERM, shared by the HTTP and gRPC sides of one gateway process.

1. `begin()`: readiness fails (/readyz 503, gRPC health NOT_SERVING) and every new request
   gets 503 / UNAVAILABLE "the server is restarting" (DrainMiddleware, DrainInterceptor), so
   a load balancer moves traffic away while the process still answers.
2. Running streams go on for up to the grace period (Settings.drain_grace_s).
3. Then each stream still running is stopped: its client gets a final error event (SSE) or
   status (gRPC UNAVAILABLE) saying the server is restarting; the turn's bookkeeping (refund,
   stream slot, turn lock, partial reply stored) runs as for any other ending.

Turns register here (TurnStream) so the drain knows what is still running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.core.errors import ServiceUnavailable

log = logging.getLogger(__name__)

RESTARTING_MESSAGE = "The server is restarting; please retry in a few seconds."
# Paths that keep answering while draining: liveness (the process is fine, do not kill it),
# readiness (answers 503 itself) and metrics.
_ALWAYS_SERVED = frozenset({"/healthz", "/readyz", "/metrics"})


def restarting_error() -> ServiceUnavailable:
    return ServiceUnavailable(
        RESTARTING_MESSAGE, code="server_restarting", headers={"Retry-After": "2"}
    )


class Stoppable(Protocol):
    def stop_for_restart(self) -> None: ...


class DrainState:
    def __init__(self) -> None:
        self.draining = False  # new requests are refused
        self.expired = False  # grace over: running turns are stopped, new ones at once
        self.turns: set[Stoppable] = set()
        self._cut = False  # a second signal: no more grace
        self._changed = asyncio.Event()
        self.on_begin: list[Callable[[], Awaitable[None]]] = []

    def add(self, turn: Stoppable) -> None:
        self.turns.add(turn)
        if self.expired:  # admitted just before the drain, started after its grace
            # Next loop pass: the turn's task must have started, or cancelling it would skip
            # its bookkeeping and final event.
            asyncio.get_running_loop().call_soon(turn.stop_for_restart)

    def discard(self, turn: Stoppable) -> None:
        self.turns.discard(turn)
        self._changed.set()

    def cut_short(self) -> None:
        """End the grace period now (a second SIGTERM / Ctrl-C)."""
        self._cut = True
        self._changed.set()

    async def begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        for hook in self.on_begin:
            try:
                await hook()
            except Exception:  # a failed hook must not stop the drain
                log.exception("drain hook failed")

    async def run(self, grace_s: float) -> int:
        """Drain: refuse new work, wait up to grace_s for running turns, then stop the rest
        and wait for their bookkeeping. Returns how many turns were stopped."""
        await self.begin()
        deadline = time.monotonic() + max(0.0, grace_s)
        while self.turns and not self._cut and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                break
        self.expired = True
        stopped = list(self.turns)
        for turn in stopped:
            turn.stop_for_restart()
        if stopped:
            log.warning("drain: grace of %.1f s over; stopping %d stream(s)", grace_s, len(stopped))
        # Their final events and bookkeeping take moments; bounded in case one hangs.
        end = time.monotonic() + 10
        while self.turns and time.monotonic() < end:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=end - time.monotonic())
            except TimeoutError:
                break
        return len(stopped)


class DrainMiddleware:
    """Pure ASGI: while draining, every HTTP request but health and metrics gets a 503 with
    an OpenAI-shaped body, `Retry-After` and `Connection: close`."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.state.draining
            or scope.get("path") in _ALWAYS_SERVED
        ):
            await self.app(scope, receive, send)
            return
        err = restarting_error()
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", err.headers["Retry-After"].encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """While draining, new gRPC calls (except health checks) end with UNAVAILABLE."""

    def __init__(self, state: DrainState) -> None:
        self.state = state

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not self.state.draining or method.startswith("/grpc.health."):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, RESTARTING_MESSAGE)

        async def refuse_stream(request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, RESTARTING_MESSAGE)
            yield  # pragma: no cover - makes this an async generator

        kw = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse, **kw)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
        return handler  # no streaming-request methods in dsv2.v1.Chat
