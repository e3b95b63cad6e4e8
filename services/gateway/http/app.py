"""The HTTP app factory: `create_app(settings, backend)` or `create_app(gateway=...)`."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.backends.model_plane import ModelBackend
from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS
from services.gateway.core.drain import DrainMiddleware
from services.gateway.core.errors import GatewayError, error_body
from services.gateway.http.errors import error_json, error_response
from services.gateway.http.fast_lane import ChatCompletionsLane
from services.gateway.http.middleware import GatewayMiddleware
from services.gateway.http.routes import admin, health, openai_api, sessions, usage
from services.gateway.http.schemas import ErrorBody
from services.gateway.settings import Settings
from services.gateway.state import Gateway

try:  # the web page (owned by the page helper); the API works without it
    from services.gateway.http.routes.page import router as page_router
except ImportError:  # pragma: no cover - only while the page does not exist yet
    page_router = None

ERROR_RESPONSES = {
    400: {"model": ErrorBody, "description": "Invalid input; the message says what to fix"},
    401: {"model": ErrorBody, "description": "Missing or invalid API key"},
    429: {"model": ErrorBody, "description": "A quota is exhausted (see Retry-After)"},
    503: {"model": ErrorBody, "description": "Redis or the model plane is unavailable"},
}


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    app.add_exception_handler(GatewayError, handle)
    app.add_exception_handler(RequestValidationError, handle)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"No route {request.method} {request.url.path}."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            msg = str(exc.detail)
        body = error_body(msg, "invalid_request_error", str(exc.status_code))
        return error_json(exc.status_code, body, dict(exc.headers or {}))

    for exc_type in REDIS_DOWN_ERRORS:
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(Exception, handle)


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
            from services.gateway.backends.model_plane import GrpcModelBackend

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
    if gateway.settings.http_fast_lane:
        # Added first, so it sits inside GatewayMiddleware (body cap, cookies, headers,
        # metrics apply to it as to every route).
        app.add_middleware(ChatCompletionsLane)
    app.add_middleware(GatewayMiddleware, settings=gateway.settings, metrics=gateway.metrics)
    # Outermost: while draining (SIGTERM), new requests get 503 before any other work.
    app.add_middleware(DrainMiddleware, state=gateway.drain_state)
    app.include_router(health.router)
    app.include_router(openai_api.router)
    app.include_router(sessions.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    if page_router is not None:
        app.include_router(page_router)
    return app
