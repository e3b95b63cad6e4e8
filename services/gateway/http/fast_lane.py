"""POST /v1/chat/completions without FastAPI's per-request machinery.

FastAPI's routing, dependency solving and body handling cost ~0.2 ms of CPU per request, as
much as the rest of the gateway's own work for a chat completion. This pure-ASGI middleware
takes that one route and does the same steps by hand, in FastAPI's order: read the body
(refusing one that is not JSON), resolve the caller (401 before any body validation error),
validate the body with the same pydantic model, then run the route's own steps,
`openai_api.admit` and `openai_api.respond`. The caller's API key may come from the key cache
(keys.py); quota admission then confirms it in the same Lua call, and anything refused before
admission is answered again with a fresh lookup, so a revoked key or a changed tier takes
effect at once, as without the cache. Errors become the same responses through
http_errors.error_response. The route stays declared in FastAPI (OpenAPI schema; and it serves the requests when
DSV2_HTTP_FAST_LANE=false); tests/gateway/test_fast_lane.py checks both give the same answers.
"""

from __future__ import annotations

import json
from email.message import Message

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS
from services.gateway.core.errors import RateLimited, ServiceUnavailable
from services.gateway.core.validation import parse_json
from services.gateway.http.deps import resolve_identity
from services.gateway.http.errors import error_response
from services.gateway.http.routes.openai_api import admit, respond
from services.gateway.http.schemas import ChatCompletionRequest

PATH = "/v1/chat/completions"


def _retry_fresh(exc: Exception) -> bool:
    """Whether a refusal met with a cached identity is worth a fresh key lookup: not a 429
    (admission confirmed the key before refusing), not a refusal after admission (which
    confirmed the key and counted the request: chat.py), and not a Redis outage (a reply
    lost in one must not lead to a second admission)."""
    if isinstance(exc, RateLimited) or isinstance(exc, REDIS_DOWN_ERRORS):
        return False
    if getattr(exc, "after_admission", False):
        return False
    return not (isinstance(exc, ServiceUnavailable) and exc.code == "redis_unavailable")


_MISSING = object()


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test (strict content type): application/json or application/*+json."""
    if not content_type:
        return False
    if content_type == "application/json":
        return True
    m = Message()
    m["content-type"] = content_type
    if m.get_content_maintype() != "application":
        return False
    sub = m.get_content_subtype()
    return sub == "json" or sub.endswith("+json")


def _parse(request: Request, raw: bytes) -> object:
    """The body as FastAPI hands it to validation: _MISSING when empty, the raw bytes when not
    declared as JSON, else the decoded JSON (RequestValidationError when it is not JSON)."""
    if not raw:
        return _MISSING
    if not _is_json(request.headers.get("content-type")):
        return raw
    try:
        return parse_json(raw)  # the reader FastAPI's route uses too (json_route.py)
    except json.JSONDecodeError as e:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", e.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": e.msg},
                }
            ],
            body=e.doc,
        ) from e


def _validate(data: object) -> ChatCompletionRequest:
    if data is _MISSING:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        return ChatCompletionRequest.model_validate(data, from_attributes=True)  # as FastAPI
    except ValidationError as e:
        errors = [
            {**err, "loc": ("body", *err["loc"])}
            for err in e.errors(include_url=False, include_context=True)
        ]
        raise RequestValidationError(errors, body=data) from e


class _RouteLabel:
    """Stands in for FastAPI's route in the scope: the middleware labels metrics by
    `scope["route"].path`, the route template."""

    path = PATH


class ChatCompletionsLane:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = _RouteLabel
        request = Request(scope, receive, send)
        gw = scope["app"].state.gateway
        try:
            data = _parse(request, await request.body())
            identity = await resolve_identity(request, gw, cached=True)
            try:
                admitted = await admit(request, gw, identity, _validate(data))
            except Exception as exc:
                if identity.key_check is None or not _retry_fresh(exc):
                    raise
                # The key came from the key cache, unconfirmed, and something refused the
                # request before admission: a revoked key, a changed tier, or an error whose
                # answer may depend on them (a 401 goes before a 400). Answer as with a fresh
                # lookup. Nothing was taken: admission is atomic and checks the key first, and
                # errors after it are not retried (_retry_fresh).
                identity = await resolve_identity(request, gw)
                admitted = await admit(request, gw, identity, _validate(data))
            response = await respond(request, gw, admitted)
        except Exception as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)
