"""Errors the gateway reports to clients, each with its HTTP status and gRPC code, so HTTP and
gRPC handlers say the same thing. Bodies follow the OpenAI error shape."""

from __future__ import annotations

from typing import Any

import grpc


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error shape, `{"error": {"message", "type", "code", "param"}}`: the one
    builder every error body of the gateway (HTTP responses, SSE error events) goes through,
    so clients written for OpenAI's API parse all of them the same way."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


class GatewayError(Exception):
    status: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


class InvalidInput(GatewayError):
    status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"


class Unauthenticated(GatewayError):
    status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, **kw) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class Forbidden(GatewayError):
    status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    type = "permission_error"
    default_code = "forbidden"


class NotFound(GatewayError):
    status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    type = "not_found_error"
    default_code = "not_found"


class Conflict(GatewayError):
    status = 409
    grpc_code = grpc.StatusCode.ABORTED
    type = "conflict_error"
    default_code = "turn_in_progress"


class PayloadTooLarge(GatewayError):
    status = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "service_unavailable"


def redis_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The gateway's state store (Redis) is unavailable; please retry in a few seconds.",
        code="redis_unavailable",
        headers={"Retry-After": "2"},
    )


def model_unavailable(detail: str = "") -> ServiceUnavailable:
    msg = "The model plane is unavailable; please retry in a few seconds."
    if detail:
        msg += f" ({detail})"
    return ServiceUnavailable(msg, code="model_unavailable", headers={"Retry-After": "2"})


# Seconds a shed caller is asked to wait: long enough for the model plane's queue to drain a
# little, short enough that a person retrying by hand does not give up.
SHED_RETRY_AFTER_S = 5


def model_overloaded(detail: str = "") -> ServiceUnavailable:
    """The model plane shed this request (its tier's class is refused while the queue is past
    its bound); nothing was charged for its tokens."""
    msg = (
        "The service is at capacity and is not taking requests of your tier right now; "
        f"please retry in {SHED_RETRY_AFTER_S} seconds. Your token quota was not charged."
    )
    if detail:
        msg += f" ({detail})"
    return ServiceUnavailable(
        msg, code="overloaded", headers={"Retry-After": str(SHED_RETRY_AFTER_S)}
    )
