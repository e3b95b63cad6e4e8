"""The HTTP app factory: `create_app(settings, backend)` or `create_app(gateway=...)`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.backend import ModelBackend
from services.gateway.errors import GatewayError, redis_unavailable
from services.gateway.middleware import GatewayMiddleware
from services.gateway.redis_store import REDIS_DOWN_ERRORS
from services.gateway.routes import health, openai_api, sessions, usage
from services.gateway.schemas import ErrorBody
from services.gateway.settings import Settings
from services.gateway.state import Gateway

log = logging.getLogger(__name__)

try:  # the web page (owned by the page helper); the API works without it
    from services.gateway.routes.page import router as page_router
except ImportError:  # pragma: no cover - only while the page does not exist yet
    page_router = None

ERROR_RESPONSES = {
    400: {"model": ErrorBody, "description": "Invalid input; the message says what to fix"},
    401: {"model": ErrorBody, "description": "Missing or invalid API key"},
    429: {"model": ErrorBody, "description": "A quota is exhausted (see Retry-After)"},
    503: {"model": ErrorBody, "description": "Redis or the model plane is unavailable"},
}


def _error_json(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        if exc.code == "redis_unavailable":
            request.app.state.gateway.metrics.redis_errors.inc()
        return _error_json(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _describe_validation(exc)
        body = {
            "error": {
                "message": msg,
                "type": "invalid_request_error",
                "code": "invalid_value",
                "param": param,
            }
        }
        return _error_json(400, body)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"No route {request.method} {request.url.path}."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            msg = str(exc.detail)
        body = {
            "error": {
                "message": msg,
                "type": "invalid_request_error",
                "code": str(exc.status_code),
                "param": None,
            }
        }
        return _error_json(exc.status_code, body, dict(exc.headers or {}))

    for exc_type in REDIS_DOWN_ERRORS:

        @app.exception_handler(exc_type)
        async def redis_down(request: Request, exc: Exception) -> JSONResponse:
            request.app.state.gateway.metrics.redis_errors.inc()
            err = redis_unavailable()
            return _error_json(err.status, err.body(), err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {
            "error": {
                "message": "Internal error in the gateway; it has been logged.",
                "type": "server_error",
                "code": None,
                "param": None,
            }
        }
        return _error_json(500, body)


def create_app(
    settings: Settings | None = None,
    backend: ModelBackend | None = None,
    *,
    gateway: Gateway | None = None,
) -> FastAPI:
    """The FastAPI app. Pass a Gateway to share one with the gRPC server (it is then closed by
    its owner); otherwise one is built from settings + backend and closed on shutdown."""
    owns_gateway = gateway is None
    if gateway is None:
        settings = settings or Settings()
        if backend is None:
            from services.gateway.backend import GrpcModelBackend

            backend = GrpcModelBackend(
                settings.model_target, settings.model_app, timeout_s=settings.model_timeout_s
            )
        gateway = Gateway(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_gateway:
            await gateway.close()

    app = FastAPI(
        title="dsv2-serve gateway",
        version="0.1.0",
        description="OpenAI-compatible chat API, chat sessions and quotas for DeepSeek-V2 models.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, settings=gateway.settings, metrics=gateway.metrics)
    app.include_router(health.router)
    app.include_router(openai_api.router)
    app.include_router(sessions.router)
    app.include_router(usage.router)
    if page_router is not None:
        app.include_router(page_router)
    return app
