"""Error responses of the HTTP API (OpenAI error shape), shared by the app's exception
handlers and the fast lane, which handles its route outside FastAPI's routing."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS
from services.gateway.core.errors import GatewayError, error_body, redis_unavailable

log = logging.getLogger(__name__)


def error_json(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    param = None
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            problems.append(
                f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})"
            )
            continue
        if not where and err.get("type") in ("model_attributes_type", "dict_type"):
            problems.append(
                "the request body must be a JSON object (send Content-Type: application/json)"
            )
            continue
        if param is None and where:
            param = where
        problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    extra = len(exc.errors()) - 3
    msg = "Invalid request: " + "; ".join(problems)
    if extra > 0:
        msg += f" (and {extra} more)"
    return msg, param


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    msg, param = _describe_validation(exc)
    return error_json(400, error_body(msg, "invalid_request_error", "invalid_value", param))


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The response for an exception raised while handling a request: the app's exception
    handlers, and the fast lane (fast_lane.py), which runs outside FastAPI's routing."""
    if isinstance(exc, GatewayError):
        if exc.code == "redis_unavailable":
            request.app.state.gateway.metrics.redis_errors.inc()
        return error_json(exc.status, exc.body(), exc.headers)
    if isinstance(exc, RequestValidationError):
        return validation_error_response(exc)
    if isinstance(exc, REDIS_DOWN_ERRORS):
        request.app.state.gateway.metrics.redis_errors.inc()
        err = redis_unavailable()
        return error_json(err.status, err.body(), err.headers)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = error_body("Internal error in the gateway; it has been logged.", "server_error")
    return error_json(500, body)
