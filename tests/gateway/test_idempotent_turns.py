"""Retried session turns with an Idempotency-Key (HTTP header, gRPC `idempotency_key`): a
retry never stores the user's message twice. A turn stored whole is replayed (nothing
generated, nothing charged); one cut short by a model-plane error is generated again and its
partial reply replaced."""

from __future__ import annotations

import grpc
import httpx

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.conftest import ThreadedGateway, auth, read_sse


async def _turn(
    c: httpx.AsyncClient, key: str, sid: str, content: str, idem: str | None
) -> tuple[int, list]:
    headers = auth(key) | ({"Idempotency-Key": idem} if idem is not None else {})
    async with c.stream(
        "POST", f"/v1/sessions/{sid}/messages", json={"content": content}, headers=headers
    ) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.json()]
        return 200, await read_sse(r)


def _text(events: list) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


async def _tokens_left(c: httpx.AsyncClient, key: str) -> int:
    return (await c.get("/v1/usage", headers=auth(key))).json()["tokens_per_day"]["remaining"]


async def test_retry_after_a_whole_reply_is_replayed(gateway: ThreadedGateway):
    key = gateway.create_key("idem1", "budget")  # a token budget, to see nothing is charged
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={}, headers=auth(key))).json()["id"]
        code, first = await _turn(c, key, sid, "hello there", "turn-1")
        assert code == 200 and first[-1]["finish_reason"] == "stop"
        left = await _tokens_left(c, key)
        generations = len(gateway.backend.requests)

        code, again = await _turn(c, key, sid, "hello there", "turn-1")
        assert code == 200
        done = again[-1]
        assert done["replayed"] is True and done["message_id"] == first[-1]["message_id"]
        assert done["usage"]["total_tokens"] == 0
        assert _text(again) == _text(first)
        assert len(gateway.backend.requests) == generations  # nothing generated
        assert await _tokens_left(c, key) == left  # nothing charged

        msgs = (await c.get(f"/v1/sessions/{sid}", headers=auth(key))).json()["messages"]
        assert [(m["role"], m["content"]) for m in msgs] == [
            ("user", "hello there"),
            ("assistant", _text(first)),
        ]
        # A new key is a new turn.
        code, _ = await _turn(c, key, sid, "hello there", "turn-2")
        msgs = (await c.get(f"/v1/sessions/{sid}", headers=auth(key))).json()["messages"]
        assert code == 200 and len(msgs) == 4


async def test_retry_after_a_failed_reply_replaces_it(gateway: ThreadedGateway):
    key = gateway.create_key("idem2", "internal")
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={}, headers=auth(key))).json()["id"]
        await _turn(c, key, sid, "first words", "a")
        gateway.backend.fail_after = 3  # the model plane fails mid-reply
        code, failed = await _turn(c, key, sid, "tell me more", "b")
        assert code == 200 and failed[-1]["finish_reason"] == "error" and failed[-1]["error"]
        msgs = (await c.get(f"/v1/sessions/{sid}", headers=auth(key))).json()["messages"]
        assert len(msgs) == 4 and msgs[3]["content"] == _text(failed)  # the partial reply

        gateway.backend.fail_after = None
        code, retried = await _turn(c, key, sid, "tell me more", "b")
        assert code == 200 and retried[-1]["finish_reason"] == "stop"
        assert "replayed" not in retried[-1]
        # The retry was generated from the history before the failed attempt.
        assert [m.content for m in gateway.backend.requests[-1].messages.messages] == [
            "first words",
            gateway.backend.expected_reply("first words"),
            "tell me more",
        ]
        msgs = (await c.get(f"/v1/sessions/{sid}", headers=auth(key))).json()["messages"]
        assert [(m["role"], m["content"]) for m in msgs] == [
            ("user", "first words"),
            ("assistant", gateway.backend.expected_reply("first words")),
            ("user", "tell me more"),
            ("assistant", _text(retried)),
        ]
        assert msgs[3]["id"] == retried[-1]["message_id"]
        # And once whole, the same key replays it.
        code, replay = await _turn(c, key, sid, "tell me more", "b")
        assert replay[-1]["replayed"] is True and _text(replay) == _text(retried)


async def test_reused_or_malformed_key_is_a_clear_400(gateway: ThreadedGateway):
    key = gateway.create_key("idem3", "internal")
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={}, headers=auth(key))).json()["id"]
        await _turn(c, key, sid, "one", "k1")
        code, body = await _turn(c, key, sid, "another message", "k1")
        err = body[0]["error"]
        assert code == 400 and err["code"] == "idempotency_key_reused"
        assert err["param"] == "Idempotency-Key"
        for bad in ("", "x" * 256, "tab\there"):
            code, body = await _turn(c, key, sid, "two", bad)
            assert code == 400 and body[0]["error"]["code"] == "invalid_idempotency_key", bad
        msgs = (await c.get(f"/v1/sessions/{sid}", headers=auth(key))).json()["messages"]
        assert len(msgs) == 2  # refused retries stored nothing


async def test_grpc_idempotency_key(gateway: ThreadedGateway):
    key = gateway.create_key("idem4", "internal")
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        stub = chat_pb2_grpc.ChatStub(ch)
        sid = (await stub.CreateSession(cpb.CreateSessionRequest(), metadata=md)).id
        req = cpb.ChatRequest(
            session_id=sid,
            messages=[cpb.Message(role="user", content="over grpc")],
            idempotency_key="g-1",
        )
        first = [r async for r in stub.Chat(req, metadata=md)]
        again = [r async for r in stub.Chat(req, metadata=md)]
        assert not first[-1].replayed and again[-1].replayed
        assert again[-1].message_id == first[-1].message_id
        assert "".join(r.delta for r in again) == "".join(r.delta for r in first)
        stored = await stub.GetSession(cpb.GetSessionRequest(session_id=sid), metadata=md)
        assert [m.role for m in stored.messages] == ["user", "assistant"]
