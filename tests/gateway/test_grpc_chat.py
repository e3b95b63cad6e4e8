"""gRPC dsv2.v1.Chat for internal clients: API key required, streaming, sessions, quota
refusals with their facts in trailing metadata, standard health and reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.conftest import ThreadedGateway


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def channel(gateway: ThreadedGateway):
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        yield ch


async def test_streaming_chat_with_key(gateway: ThreadedGateway, channel):
    stub = chat_pb2_grpc.ChatStub(channel)
    key = gateway.create_key("svc", "internal")
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="ping me")], max_tokens=16)
    out = [r async for r in stub.Chat(req, metadata=md(key))]
    text = "".join(r.delta for r in out)
    assert text == gateway.backend.expected_reply("ping me")
    last = out[-1]
    assert last.finish_reason == "stop"
    assert last.usage.completion_tokens == 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8


async def test_without_key_unauthenticated(gateway: ThreadedGateway, channel):
    stub = chat_pb2_grpc.ChatStub(channel)
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="hi")])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        [r async for r in stub.Chat(req)]
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetUsage(cpb.UsageRequest(), metadata=md("dsv2-bogus"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert gateway.backend.requests == []


async def test_sessions_over_grpc(gateway: ThreadedGateway, channel):
    stub = chat_pb2_grpc.ChatStub(channel)
    key, other = gateway.create_key("svc"), gateway.create_key("other")
    s = await stub.CreateSession(cpb.CreateSessionRequest(title="ops"), metadata=md(key))
    req = cpb.ChatRequest(session_id=s.id, messages=[cpb.Message(role="user", content="status")])
    out = [r async for r in stub.Chat(req, metadata=md(key))]
    assert out[-1].message_id and out[-1].session_id == s.id
    got = await stub.GetSession(cpb.GetSessionRequest(session_id=s.id), metadata=md(key))
    assert [m.role for m in got.messages] == ["user", "assistant"]
    listed = await stub.ListSessions(cpb.ListSessionsRequest(), metadata=md(key))
    assert [x.id for x in listed.sessions] == [s.id]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetSession(cpb.GetSessionRequest(session_id=s.id), metadata=md(other))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    bad = cpb.ChatRequest(session_id=s.id, messages=[])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        [r async for r in stub.Chat(bad, metadata=md(key))]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stub.DeleteSession(cpb.DeleteSessionRequest(session_id=s.id), metadata=md(key))
    usage = await stub.GetUsage(cpb.UsageRequest(), metadata=md(key))
    assert usage.tier == "free" and usage.requests_per_minute.remaining == 999


async def test_quota_refusal_is_resource_exhausted_with_trailers(gateway: ThreadedGateway, channel):
    stub = chat_pb2_grpc.ChatStub(channel)
    key = gateway.create_key("svc2", "tight")
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="x")], max_tokens=1)
    for _ in range(50):
        [r async for r in stub.Chat(req, metadata=md(key))]
    call = stub.Chat(req, metadata=md(key))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        [r async for r in call]
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(e.value.trailing_metadata())
    assert trailers["x-ratelimit-limit-requests"] == "50"
    assert trailers["x-ratelimit-remaining-requests"] == "0"
    assert int(trailers["retry-after"]) >= 1


async def test_health_serving_and_reflection(gateway: ThreadedGateway, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dsv2.v1.Chat"):
        r = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "dsv2.v1.Chat" in names and "grpc.health.v1.Health" in names
