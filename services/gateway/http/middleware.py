"""Pure-ASGI middleware: request body cap, cookies/rate-limit headers decided during the
request, and HTTP metrics. Pure ASGI (not BaseHTTPMiddleware) so streaming responses and
disconnect detection pass through untouched."""

from __future__ import annotations

import json
import time
from http.cookies import SimpleCookie

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.core.errors import error_body
from services.gateway.core.identity import ANON_COOKIE, client_ip
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import Settings

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _error(status: int, message: str, code: str) -> tuple[dict, bytes]:
    body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, body


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: GatewayMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    def _cookie_header(self, value: str) -> bytes:
        c = SimpleCookie()
        c[ANON_COOKIE] = value
        m = c[ANON_COOKIE]
        m["path"] = "/"
        m["max-age"] = str(self.settings.cookie_max_age_days * 86400)
        m["httponly"] = True
        m["samesite"] = "Lax"
        if self.settings.cookie_secure:
            m["secure"] = True
        return m.OutputString().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status_holder = {"status": 500}

        if scope["method"] == "POST" and await self._refused_anonymous_ip(scope, send):
            self._observe(scope, 429, started)
            return
        if scope["method"] in _BODY_METHODS:
            receive = await self._buffer_body(scope, receive, send)
            if receive is None:
                self._observe(scope, 413, started)
                return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                cookie = state.get("anon_cookie")
                ratelimit = state.get("ratelimit_headers")
                if cookie or ratelimit:
                    headers = list(message.get("headers", []))
                    if cookie:
                        headers.append((b"set-cookie", self._cookie_header(cookie)))
                    if ratelimit:
                        present = {h[0].lower() for h in headers}
                        for k, v in ratelimit.items():
                            name = k.lower().encode()
                            if name not in present:
                                headers.append((name, v.encode()))
                    message = {**message, "headers": headers}
                self._observe(scope, message["status"], started)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    async def _refused_anonymous_ip(self, scope: Scope, send: Send) -> bool:
        """An anonymous request to a route that takes quota, from an IP whose request window
        is known to be spent (quotas.RefusalMemo): answer 429 before reading the body."""
        path = scope["path"]
        if path != "/v1/chat/completions" and not (
            path.startswith("/v1/sessions/") and path.endswith("/messages")
        ):
            return False
        headers = dict(scope.get("headers", []))
        if b"authorization" in headers:
            return False
        client = scope.get("client")
        ip = client_ip(
            client[0] if client else None,
            headers.get(b"x-forwarded-for", b"").decode("latin-1") or None,
            self.settings.trusted_proxy_networks,
        )
        gw = scope["app"].state.gateway
        err = gw.quotas.memo.refusal(["ip:" + ip])
        if err is None:
            return False
        gw.metrics.quota_rejections.labels(err.code or "unknown").inc()
        await gw.quotas.slow_down()
        body = json.dumps(err.body()).encode()
        start = {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in err.headers.items()),
            ],
        }
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return True

    async def _buffer_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the (small) body up front so an oversized one is refused with 413 before any
        work; later receive() calls pass through, so disconnects are still seen."""
        cap = self.settings.body_limit_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared > cap or declared < 0:
                    await self._send_413(send, cap)
                    return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # Client went away before sending the body: hand that on.
                pending = [message]
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await self._send_413(send, cap)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            if pending:
                return pending.pop(0)
            return await receive()

        return replay

    async def _send_413(self, send: Send, cap: int) -> None:
        start, body = _error(
            413, f"Request body too large: the limit is {cap} bytes.", "payload_too_large"
        )
        await send(start)
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.observe_http(path, scope["method"], status, time.perf_counter() - started)
