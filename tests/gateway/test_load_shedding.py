"""The model plane's load shedding as callers see it, over real Redis: the gateway sends each
tier's priority class; a request the model plane sheds gets 503 + Retry-After with an
OpenAI-shaped body (HTTP) or UNAVAILABLE with retry-after metadata (gRPC), its token
reservation is refunded, and a session turn leaves no trace; paid tiers are still served.

The model plane here is the scripted double (tests/gateway/scripted_backend.py) shedding the
classes a test names, in-process and behind a real gRPC server; the engine's own shedding
decision is tested on the real engine in tests/engine/test_load_shedding.py."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from services.gateway.core.tiers import TierConfigError, load_tiers
from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from services.rpc.dsv2.v1 import inference_pb2 as pb
from tests.gateway.conftest import ThreadedGateway, auth, read_sse

BODY = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=["in-process", "over-grpc"])
def any_gateway(request, gateway, grpc_backed_gateway, redis_server) -> ThreadedGateway:
    """Shedding seen through embedded mode (Overloaded by name) and over gRPC
    (RESOURCE_EXHAUSTED from the model plane)."""
    if request.param == "in-process":
        return gateway
    g = grpc_backed_gateway
    g.reset(redis_server)
    g.backend.requests.clear()
    g.backend.shed_priorities.clear()
    return g


async def tokens_used(c: httpx.AsyncClient, key: str) -> int:
    u = (await c.get("/v1/usage", headers=auth(key))).json()["tokens_per_day"]
    return u["limit"] - u["remaining"]


async def test_shed_free_request_is_503_with_retry_after_and_refunded(
    any_gateway: ThreadedGateway,
):
    gw = any_gateway
    gw.backend.shed_priorities.update({pb.PRIORITY_FREE})
    key = gw.create_key("flooded", "budget")  # free class; 600 tokens a day
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        for body in (BODY, {**BODY, "stream": True}):
            r = await c.post("/v1/chat/completions", json=body, headers=auth(key))
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5"
            err = r.json()["error"]
            assert err["code"] == "overloaded" and err["type"] == "service_unavailable"
            assert "retry in 5 seconds" in err["message"]
            assert "not charged" in err["message"]
        assert await tokens_used(c, key) == 0  # both reservations refunded in full
        # Two requests reached the model plane, both as free.
        assert [r.priority for r in gw.backend.requests] == [pb.PRIORITY_FREE] * 2

        # The queue drains: the same caller is served and charged as usual.
        gw.backend.shed_priorities.clear()
        r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 200
        assert await tokens_used(c, key) == r.json()["usage"]["total_tokens"] > 0


async def test_paid_tiers_are_served_while_free_is_shed(any_gateway: ThreadedGateway):
    gw = any_gateway
    gw.backend.shed_priorities.update({pb.PRIORITY_FREE, pb.PRIORITY_UNSPECIFIED})
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        for tier, cls in (("pro", pb.PRIORITY_PRO), ("internal", pb.PRIORITY_INTERNAL)):
            key = gw.create_key(f"paying-{tier}", tier)
            r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
            assert r.status_code == 200, r.text
            assert gw.backend.requests[-1].priority == cls
        r = await c.post("/v1/chat/completions", json=BODY)  # anonymous: the free tier
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert gw.backend.requests[-1].priority == pb.PRIORITY_FREE


async def test_shed_session_turn_stores_nothing_and_frees_the_session(gateway: ThreadedGateway):
    gateway.backend.shed_priorities.add(pb.PRIORITY_FREE)
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        r = await c.post(f"/v1/sessions/{sid}/messages", json={"content": "hello"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "overloaded"
        assert (await c.get(f"/v1/sessions/{sid}")).json()["messages"] == []
        usage = (await c.get("/v1/usage")).json()["tokens_per_day"]
        assert usage["remaining"] == usage["limit"]

        gateway.backend.shed_priorities.clear()  # the turn lock was released: retry works
        async with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "hello"}) as r:
            assert r.status_code == 200
            events = await read_sse(r)
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
        messages = (await c.get(f"/v1/sessions/{sid}")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]


async def test_grpc_chat_shed_is_unavailable_with_retry_after(gateway: ThreadedGateway):
    gateway.backend.shed_priorities.add(pb.PRIORITY_FREE)
    key = gateway.create_key("grpc-free", "budget")
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="x")], max_tokens=8)
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        stub = chat_pb2_grpc.ChatStub(ch)
        md = (("authorization", f"Bearer {key}"),)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [r async for r in stub.Chat(req, metadata=md)]
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "at capacity" in e.value.details()
        assert dict(e.value.trailing_metadata())["retry-after"] == "5"
        usage = await stub.GetUsage(cpb.UsageRequest(), metadata=md)
        assert usage.tokens_per_day.remaining == usage.tokens_per_day.limit
        pro = gateway.create_key("grpc-pro", "pro")
        out = [r async for r in stub.Chat(req, metadata=(("authorization", f"Bearer {pro}"),))]
        assert out[-1].finish_reason == "stop"


def test_tiers_file_priority_must_be_a_known_class(tmp_path: Path):
    path = tmp_path / "tiers.yaml"
    path.write_text("pro:\n  priority: internal\n")
    assert load_tiers(path)["pro"].priority == "internal"
    assert load_tiers(None)["free"].priority == "free"
    path.write_text("pro:\n  priority: platinum\n")
    expected = (
        r"tier 'pro': priority: Input should be 'free', 'pro' or 'internal' \(got 'platinum'\)"
    )
    with pytest.raises(TierConfigError, match=expected):
        load_tiers(path)
    path.write_text("pro:\n  priority: 3\n")
    with pytest.raises(TierConfigError, match=r"tier 'pro': priority: .* \(got 3\)"):
        load_tiers(path)
