"""Turns in stored sessions: one at a time, history trimmed to the context window, replies
stored even when the client disconnects."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.gateway.conftest import ThreadedGateway, read_sse


async def _turn(c: httpx.AsyncClient, sid: str, content: str, **extra) -> tuple[int, list]:
    async with c.stream(
        "POST", f"/v1/sessions/{sid}/messages", json={"content": content, **extra}
    ) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.json()]
        return 200, await read_sse(r)


async def test_concurrent_turns_one_wins_one_409(gateway: ThreadedGateway, client):
    gateway.backend.delay_s = 0.05
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    results = await asyncio.gather(
        _turn(client, sid, "first one"), _turn(client, sid, "second one")
    )
    codes = sorted(code for code, _ in results)
    assert codes == [200, 409]
    loser = next(ev for code, ev in results if code == 409)[0]
    assert loser["error"]["type"] == "conflict_error"
    winner = next(ev for code, ev in results if code == 200)
    msgs = (await client.get(f"/v1/sessions/{sid}")).json()["messages"]
    assert len(msgs) == 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant"
    assert msgs[1]["id"] == winner[-1]["message_id"]
    # The lock is released when the turn ends: the next turn goes through, nothing is lost.
    code, _ = await _turn(client, sid, "third one")
    assert code == 200
    msgs = (await client.get(f"/v1/sessions/{sid}")).json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "third one"


async def test_disconnect_mid_stream_keeps_partial_reply(gateway: ThreadedGateway, client):
    gateway.backend.delay_s = 0.1
    gateway.backend.reply_tokens = 40
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    got = ""
    async with client.stream(
        "POST", f"/v1/sessions/{sid}/messages", json={"content": "tell me a long story"}
    ) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"delta"' in line:
                got += json.loads(line[5:])["text"]
                if got.count(" ") == 3:
                    break  # leave mid-stream
    for _ in range(100):
        if gateway.backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert gateway.backend.cancelled, "the generation was not cancelled"
    gateway.drain()
    msgs = (await client.get(f"/v1/sessions/{sid}")).json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    stored = msgs[1]["content"]
    generated = gateway.backend.generated[gateway.backend.cancelled[0]]
    assert 3 <= generated < 40
    # Exactly what was generated before the cancellation is kept (at least what we saw).
    assert stored == gateway.backend.expected_reply("tell me a long story", generated)
    assert stored.startswith(got)
    # The session is free again.
    gateway.backend.delay_s = 0
    code, _ = await _turn(client, sid, "again")
    assert code == 200


async def test_history_trimmed_to_context_window(gateway: ThreadedGateway, client):
    sid = (await client.post("/v1/sessions", json={"system_prompt": "be brief and kind"})).json()[
        "id"
    ]
    long = " ".join(["word"] * 300)
    for _ in range(5):
        code, _ = await _turn(client, sid, long, max_tokens=16)
        assert code == 200
    # Context 4096 in the scripted backend: 5 x (303 user + 11 reply) + system overflows with
    # a bigger request, so the oldest turns are dropped, never the system prompt.
    gateway.backend.max_context_tokens = 1000
    gateway.gateway._model_info = None  # the gateway caches model info briefly
    try:
        code, _ = await _turn(client, sid, long, max_tokens=64)
        assert code == 200
        sent = list(gateway.backend.requests[-1].messages.messages)
        assert sent[0].role == "system" and sent[0].content == "be brief and kind"
        assert sent[-1].content == long
        assert len(sent) < 1 + 5 * 2 + 1
        from tests.gateway.scripted_backend import count_message_tokens

        assert count_message_tokens(sent) + 64 <= 1000
        # A single message that cannot fit at all is a clear 400, not a truncation.
        code, body = await _turn(client, sid, " ".join(["w"] * 2000))
        assert code == 400 and body[0]["error"]["code"] == "context_length_exceeded"
    finally:
        gateway.backend.max_context_tokens = 4096
        gateway.gateway._model_info = None
