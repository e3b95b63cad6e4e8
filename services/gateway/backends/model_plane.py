"""How the gateway reaches the model plane: the `ModelBackend` protocol (the four calls of
dsv2.v1.Inference, proto messages in and out) and its gRPC implementation.

In embedded mode an `InferenceService` object (services.engine) is passed in directly; it has
the same four methods. `as_backend` wraps whatever is given so that failures surface as the
two exceptions below and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import grpc

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc as pb_grpc


class BackendUnavailable(Exception):
    """The model plane cannot be reached or failed (503)."""


class BackendOverloaded(BackendUnavailable):
    """The model plane shed the request before any work (its queue is past the bound for the
    request's priority class): 503 + Retry-After, and the token reservation is refunded."""


class BackendInvalidRequest(Exception):
    """The model plane refused the input (400), e.g. a prompt longer than the context."""


@runtime_checkable
class ModelBackend(Protocol):
    def generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]: ...
    async def tokenize(self, req: pb.TokenizeRequest) -> pb.TokenizeResponse: ...
    async def model_info(self, req: pb.ModelInfoRequest) -> pb.ModelInfoResponse: ...
    async def health(self, req: pb.HealthRequest) -> pb.HealthResponse: ...


_INVALID_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


def _map_rpc_error(e: grpc.aio.AioRpcError) -> Exception:
    if e.code() in _INVALID_CODES:
        return BackendInvalidRequest(e.details() or "invalid request")
    # The Engine's load shedding, or Serve's own back pressure (max_queued_requests): either
    # way refused before any work, so the caller may come back later and keeps its tokens.
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return BackendOverloaded(e.details() or "the model plane is overloaded")
    return BackendUnavailable(f"{e.code().name}: {e.details()}")


class GrpcModelBackend:
    """dsv2.v1.Inference over grpc.aio, e.g. Ray Serve's gRPC ingress, which routes on the
    ("application", app_name) metadata. The channel is created on first use so that it binds
    to the running event loop."""

    def __init__(self, target: str, app_name: str = "dsv2", *, timeout_s: float = 10.0) -> None:
        self.target = target
        self.app_name = app_name
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceStub | None = None

    @property
    def stub(self) -> pb_grpc.InferenceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.target,
                options=[
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.max_receive_message_length", 64 << 20),
                ],
            )
            self._stub = pb_grpc.InferenceStub(self._channel)
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("application", self.app_name),)

    async def generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(req, metadata=self.metadata)
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as e:
            raise _map_rpc_error(e) from e
        finally:
            # Closing the generator (client gone, turn cancelled) cancels the model-plane work.
            if not call.done():
                call.cancel()

    async def _unary(self, method, req):
        try:
            return await method(req, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _map_rpc_error(e) from e

    async def tokenize(self, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self._unary(self.stub.Tokenize, req)

    async def model_info(self, req: pb.ModelInfoRequest) -> pb.ModelInfoResponse:
        return await self._unary(self.stub.ModelInfo, req)

    async def health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        return await self._unary(self.stub.Health, req)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


def _map_local_error(e: Exception) -> Exception:
    # services.engine.InvalidRequest is matched by name: the gateway never imports the engine.
    if isinstance(e, BackendInvalidRequest | BackendUnavailable):
        return e
    if type(e).__name__ == "Overloaded":  # services.engine.Overloaded, by name too
        return BackendOverloaded(str(e))
    if type(e).__name__ == "InvalidRequest" or isinstance(e, ValueError):
        return BackendInvalidRequest(str(e))
    return BackendUnavailable(f"{type(e).__name__}: {e}")


class CheckedBackend:
    """Wraps any ModelBackend so its failures become BackendInvalidRequest/BackendUnavailable,
    and notes when the model plane last answered (readiness: busy is not down)."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.last_answer = float("-inf")  # time.monotonic() of the last successful answer

    def answered_within(self, seconds: float) -> bool:
        return time.monotonic() - self.last_answer <= seconds

    async def generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        agen = None
        try:
            # inside the try: the model plane's generate may refuse the request before it
            # returns a stream (an image it cannot decode, a prompt too long)
            agen = self.inner.generate(req)
            async for resp in agen:
                self.last_answer = time.monotonic()
                yield resp
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise _map_local_error(e) from e
        finally:
            aclose = None if agen is None else getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _call(self, coro):
        try:
            out = await coro
            self.last_answer = time.monotonic()
            return out
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise _map_local_error(e) from e

    async def tokenize(self, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self._call(self.inner.tokenize(req))

    async def model_info(self, req: pb.ModelInfoRequest) -> pb.ModelInfoResponse:
        return await self._call(self.inner.model_info(req))

    async def health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        return await self._call(self.inner.health(req))

    async def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()


def as_backend(obj: ModelBackend) -> CheckedBackend:
    return obj if isinstance(obj, CheckedBackend) else CheckedBackend(obj)
