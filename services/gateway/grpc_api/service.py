"""gRPC `dsv2.v1.Chat` for internal clients (API key required), plus the standard health
service and server reflection, on a grpc.aio server sharing the HTTP side's Gateway."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS
from services.gateway.core.chat import ChatParams, ChatService, Delta, turn_error
from services.gateway.core.drain import DrainInterceptor
from services.gateway.core.errors import (
    GatewayError,
    InvalidInput,
    Unauthenticated,
    redis_unavailable,
)
from services.gateway.core.identity import Identity, client_ip
from services.gateway.core.images import ImageRef, message_from_wire
from services.gateway.core.quotas import Subject
from services.gateway.core.session_admission import create_session
from services.gateway.core.sessions import LIST_MAX, Session
from services.gateway.core.validation import check_session_fields
from services.gateway.http.routes.usage import usage_out
from services.gateway.state import Gateway
from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from services.rpc.dsv2.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = cpb.DESCRIPTOR.services_by_name["Chat"].full_name


def _trailers(err: GatewayError) -> tuple[tuple[str, str], ...]:
    return tuple((k.lower(), v) for k, v in err.headers.items())


async def _abort(context: grpc.aio.ServicerContext, err: GatewayError) -> None:
    await context.abort(err.grpc_code, err.message, trailing_metadata=_trailers(err))


def _mapped(fn):
    """Map gateway errors / Redis outages to gRPC statuses, and count calls."""
    name = fn.__name__

    @functools.wraps(fn)
    async def unary(self: ChatServicer, request, context):
        code = "OK"
        try:
            return await fn(self, request, context)
        except GatewayError as e:
            code = e.grpc_code.name
            await _abort(context, e)
        except REDIS_DOWN_ERRORS:
            code = "UNAVAILABLE"
            await _abort(context, redis_unavailable())
        finally:
            self.gw.metrics.grpc_requests.labels(name, code).inc()

    return unary


def _pb_session(s: Session, with_messages: bool = False) -> cpb.Session:
    out = cpb.Session(
        id=s.id, title=s.title, created_at_ms=s.created_at_ms, updated_at_ms=s.updated_at_ms
    )
    if with_messages:
        out.messages.extend(
            cpb.Message(
                role=m.role,
                content=m.content,
                created_at_ms=m.created_at_ms,
                images=[
                    cpb.MessageImage(data=i.data, mime_type=i.mime_type) for i in m.images if i.data
                ],
            )
            for m in s.messages
        )
    return out


def _wire_message(index: int, m: cpb.Message) -> tuple[pb.ChatMessage, list[ImageRef]]:
    return message_from_wire(
        index,
        m.role,
        m.content,
        [(i.data, i.mime_type) for i in m.images],
        f"messages.{index}",
    )


class ChatServicer(chat_pb2_grpc.ChatServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.chat = ChatService(gw)

    async def _identity(self, context: grpc.aio.ServicerContext) -> Identity:
        auth = next(
            (v for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None
        )
        if not auth:
            raise Unauthenticated(
                "Missing API key: send metadata ('authorization', 'Bearer <api key>')."
            )
        peer = context.peer() or ""  # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555"
        host = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]") if ":" in peer else peer
        ip = client_ip(host, None, self.gw.settings.trusted_proxy_networks)
        return await self.gw.identity.from_api_key(str(auth), ip)

    async def Chat(
        self, request: cpb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.ChatResponse]:
        code = "OK"
        try:
            identity = await self._identity(context)
            if request.max_tokens < 0:
                raise InvalidInput(
                    "max_tokens must be >= 0 (0 = tier default).", param="max_tokens"
                )
            # The limits themselves are checked in ChatService, the same as for HTTP.
            params = ChatParams(
                max_tokens=request.max_tokens or None,
                temperature=request.temperature,
                top_p=request.top_p or 1.0,
                seed=request.seed if request.HasField("seed") else None,
                stop=list(request.stop),
            )
            if request.session_id:
                if len(request.messages) != 1 or request.messages[0].role != "user":
                    raise InvalidInput(
                        "With session_id, messages must be exactly one user message.",
                        param="messages",
                    )
                message, refs = _wire_message(0, request.messages[0])
                prepared = await self.chat.prepare_session_turn(
                    identity,
                    request.session_id,
                    message.content,
                    params,
                    idempotency_key=request.idempotency_key or None,
                    images=list(message.images),
                    refs=refs,
                    field="messages[0]",
                )
            else:
                messages, refs = [], []
                for i, m in enumerate(request.messages):
                    message, msg_refs = _wire_message(i, m)
                    messages.append(message)
                    refs += msg_refs
                prepared = await self.chat.prepare_stateless(identity, messages, params, refs)
            stream = self.chat.start(prepared)
            await stream.wait_started(self.gw.settings.model_start_timeout_s)
        except GatewayError as e:
            self.gw.metrics.grpc_requests.labels("Chat", e.grpc_code.name).inc()
            await _abort(context, e)
            return
        except REDIS_DOWN_ERRORS:
            self.gw.metrics.grpc_requests.labels("Chat", "UNAVAILABLE").inc()
            await _abort(context, redis_unavailable())
            return
        if prepared.lease.state is not None:
            await context.send_initial_metadata(
                tuple((k, v) for k, v in prepared.lease.state.headers().items())
            )
        try:
            async for ev in stream:
                if isinstance(ev, Delta):
                    yield cpb.ChatResponse(delta=ev.text)
                    continue
                r = ev.result
                if r.finish_reason == "error":
                    # Never status OK for a failed turn (the drain's "server restarting"
                    # included): the status carries the reason.
                    err = turn_error(r)
                    code = err.grpc_code.name
                    await _abort(context, err)
                    return
                yield cpb.ChatResponse(
                    finish_reason=r.finish_reason,
                    usage=cpb.ChatUsage(
                        prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.completion_tokens,
                        total_tokens=r.total_tokens,
                    ),
                    session_id=request.session_id,
                    message_id=r.message_id or "",
                    replayed=r.replayed,
                )
        finally:
            stream.cancel()
            self.gw.metrics.grpc_requests.labels("Chat", code).inc()

    @_mapped
    async def CreateSession(self, request, context) -> cpb.Session:
        identity = await self._identity(context)
        check_session_fields(request.title, request.system_prompt, self.gw.settings.limits)
        s = await create_session(self.gw, identity, request.title.strip(), request.system_prompt)
        return _pb_session(s)

    @_mapped
    async def GetSession(self, request, context) -> cpb.Session:
        identity = await self._identity(context)
        s = await self.gw.sessions.get(identity.user_id, request.session_id)
        return _pb_session(s, with_messages=True)

    @_mapped
    async def ListSessions(self, request, context) -> cpb.ListSessionsResponse:
        identity = await self._identity(context)
        if not 0 <= request.limit <= LIST_MAX:
            raise InvalidInput(f"limit must be between 1 and {LIST_MAX} (0 = {LIST_MAX}).")
        page = await self.gw.sessions.list(
            identity.user_id, request.limit or LIST_MAX, request.after or None
        )
        return cpb.ListSessionsResponse(
            sessions=[_pb_session(s) for s in page.sessions],
            has_more=page.has_more,
            next_cursor=page.next_cursor or "",
        )

    @_mapped
    async def DeleteSession(self, request, context) -> cpb.DeleteSessionResponse:
        identity = await self._identity(context)
        await self.gw.sessions.delete(identity.user_id, request.session_id)
        return cpb.DeleteSessionResponse()

    @_mapped
    async def GetUsage(self, request, context) -> cpb.UsageResponse:
        identity = await self._identity(context)
        state = await self.gw.quotas.usage(Subject("u:" + identity.user_id, identity.tier))
        u = usage_out(identity.user_id, identity.tier.name, state)

        def q(x) -> cpb.QuotaState:
            return cpb.QuotaState(
                limit=x.limit or 0, remaining=x.remaining or 0, reset_at_ms=x.reset_at * 1000
            )

        return cpb.UsageResponse(
            user_id=u.user_id,
            tier=u.tier,
            requests_per_minute=q(u.requests_per_minute),
            requests_per_day=q(u.requests_per_day),
            tokens_per_day=q(u.tokens_per_day),
            concurrent_streams=q(u.concurrent_streams),
            images_per_day=q(u.images_per_day),
        )


@dataclass(frozen=True)
class _Undecodable:
    """Stands for a request message protobuf could not parse (e.g. a string field that is
    not UTF-8), so the handler can answer INVALID_ARGUMENT; grpc's own answer to a failing
    deserializer is UNKNOWN with a Python exception name."""

    reason: str


def _tolerant(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(raw: bytes) -> object:
        try:
            return deserialize(raw)
        except DecodeError as e:
            return _Undecodable(str(e))

    return parse


def _undecodable_status(request: _Undecodable) -> tuple[grpc.StatusCode, str]:
    return (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"The request message could not be parsed ({request.reason}); strings must be UTF-8.",
    )


class StrictDecoding(grpc.aio.ServerInterceptor):
    """Turns undecodable request messages into INVALID_ARGUMENT on every unary-request
    method (Chat, its session calls, health)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = _tolerant(handler.request_deserializer)
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(*_undecodable_status(request))
                async for item in inner_stream(request, context):
                    yield item

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream)
        inner = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(*_undecodable_status(request))
            return await inner(request, context)

        return handler._replace(request_deserializer=parse, unary_unary=unary_unary)


def build_grpc_server(gw: Gateway, address: str) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with Chat, health (SERVING) and reflection; returns it and its port."""
    # New calls get UNAVAILABLE while the gateway drains (drain.py); undecodable messages
    # INVALID_ARGUMENT.
    # Requests may carry pictures: the message limit grows with what the image limits allow.
    server = grpc.aio.server(
        interceptors=[DrainInterceptor(gw.drain_state), StrictDecoding()],
        options=[("grpc.max_receive_message_length", gw.settings.body_limit_bytes)],
    )
    chat_pb2_grpc.add_ChatServicer_to_server(ChatServicer(gw), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(address)
    server.health = health  # type: ignore[attr-defined]
    return server, port


async def mark_serving(server: grpc.aio.Server, serving: bool = True) -> None:
    health: health_aio.HealthServicer = server.health  # type: ignore[attr-defined]
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
