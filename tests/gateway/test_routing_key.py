"""The gateway tells the model plane which conversation a request continues
(GenerateRequest.session_id), so its router can send the turns to the Engine replica that
caches the conversation. Scripted model plane (a test double, see scripted_backend.py)."""

from __future__ import annotations

from tests.gateway.conftest import ThreadedGateway, read_sse


async def _complete(client, messages: list[dict]) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "dsv2-scripted", "messages": messages, "max_tokens": 4},
    )
    assert r.status_code == 200, r.text


async def test_a_stateless_chat_keeps_one_key_across_turns(gateway: ThreadedGateway, client):
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    await _complete(client, opening)
    await _complete(
        client,
        [*opening, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}],
    )
    await _complete(client, [{"role": "user", "content": "another chat"}])
    first, second, other = (r.session_id for r in gateway.backend.requests)
    assert first.startswith("conv-") and first == second
    assert other.startswith("conv-") and other != first


async def test_session_turns_carry_the_session_id(gateway: ThreadedGateway, client):
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    for content in ("one", "two"):
        async with client.stream(
            "POST", f"/v1/sessions/{sid}/messages", json={"content": content, "max_tokens": 4}
        ) as r:
            assert r.status_code == 200
            await read_sse(r)
    assert [r.session_id for r in gateway.backend.requests] == [sid, sid]
