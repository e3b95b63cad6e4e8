"""The OpenAI-compatible API, driven by the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from services.rpc.dsv2.v1 import inference_pb2 as pb
from tests.gateway.conftest import ThreadedGateway, auth, read_sse
from tests.gateway.scripted_backend import count_message_tokens

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "name three colours"},
]
PROMPT_TOKENS = count_message_tokens([pb.ChatMessage(**m) for m in MESSAGES])


@pytest.fixture(params=["in-process", "over-grpc"])
def any_gateway(request, gateway, grpc_backed_gateway, redis_server) -> ThreadedGateway:
    """The same checks with the backend in-process (embedded mode) and over gRPC."""
    if request.param == "in-process":
        return gateway
    g = grpc_backed_gateway
    g.reset(redis_server)
    g.backend.requests.clear()
    return g


def oai(gw: ThreadedGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.http_url + "/v1", api_key=key, max_retries=0)


async def test_models_and_non_streaming(any_gateway: ThreadedGateway):
    client = oai(any_gateway, any_gateway.create_key("u1", "pro"))
    models = await client.models.list()
    assert [m.id for m in models.data] == ["dsv2-scripted"]
    resp = await client.chat.completions.create(
        model="dsv2-scripted", messages=MESSAGES, max_tokens=20, temperature=0
    )
    expected = any_gateway.backend.expected_reply("name three colours")
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == PROMPT_TOKENS
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == PROMPT_TOKENS + 8
    sent = any_gateway.backend.requests[-1]
    assert [m.role for m in sent.messages.messages] == ["system", "user"]
    assert sent.sampling.max_tokens == 20 and sent.sampling.temperature == 0


async def test_streaming_with_usage(any_gateway: ThreadedGateway):
    client = oai(any_gateway, any_gateway.create_key("u2", "pro"))
    stream = await client.chat.completions.create(
        model="dsv2-scripted",
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == any_gateway.backend.expected_reply("name three colours", 5)
    assert finish == "length"  # the script wants 8 tokens, max_tokens cut it at 5
    assert usage.prompt_tokens == PROMPT_TOKENS and usage.completion_tokens == 5


async def test_errors_in_openai_shape(gateway: ThreadedGateway):
    key = gateway.create_key("u3", "pro")
    client = oai(gateway, key)
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert "dsv2-scripted" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model="dsv2-scripted", messages=[{"role": "wizard", "content": "x"}]
        )
    assert "messages.0.role" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        await oai(gateway, "dsv2-wrong").chat.completions.create(
            model="dsv2-scripted", messages=MESSAGES
        )
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        r = await c.post(
            "/v1/chat/completions",
            headers=auth(key),
            json={"model": "dsv2-scripted", "messages": MESSAGES, "max_tokens": 4090},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = await c.post(
            "/v1/chat/completions",
            headers=auth(key),
            content=b"x" * (gateway.settings.body_limit_bytes + 1),
        )
        assert r.status_code == 413 and "too large" in r.json()["error"]["message"]


async def test_every_error_path_has_the_same_body_shape(gateway: ThreadedGateway):
    """Refusals from the app's handlers, the fast lane, the body-size middleware and FastAPI's
    404/405 all carry exactly OpenAI's four error fields, so one client-side parser reads all."""
    key = gateway.create_key("u-shape", "pro")
    good = {"model": "dsv2-scripted", "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        refusals = {
            "no route": await c.get("/v1/nope"),
            "wrong method": await c.delete("/v1/models"),
            "no key": await c.post("/v1/chat/completions", headers=auth("dsv2-wrong"), json=good),
            "bad json": await c.post("/v1/chat/completions", headers=auth(key), content=b"{"),
            "bad field": await c.post(
                "/v1/chat/completions", headers=auth(key), json={**good, "top_p": -1}
            ),
            "too large": await c.post(
                "/v1/chat/completions",
                headers=auth(key),
                content=b"x" * (gateway.settings.body_limit_bytes + 1),
            ),
        }
    statuses = {name: r.status_code for name, r in refusals.items()}
    assert statuses == {
        "no route": 404,
        "wrong method": 405,
        "no key": 401,
        "bad json": 400,
        "bad field": 400,
        "too large": 413,
    }
    for name, r in refusals.items():
        body = r.json()
        assert list(body) == ["error"], name
        assert list(body["error"]) == ["message", "type", "code", "param"], name
        assert body["error"]["message"] and body["error"]["type"], name
    assert refusals["bad field"].json()["error"]["param"] == "top_p"
    assert refusals["no key"].json()["error"]["type"] == "authentication_error"


async def test_model_plane_failure_is_reported(gateway: ThreadedGateway):
    gateway.backend.fail_after = 2
    key = gateway.create_key("u4", "pro")
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        r = await c.post(
            "/v1/chat/completions",
            headers=auth(key),
            json={"model": "dsv2-scripted", "messages": MESSAGES},
        )
        assert r.status_code == 503 and "scripted failure" in r.json()["error"]["message"]
        async with c.stream(
            "POST",
            "/v1/chat/completions",
            headers=auth(key),
            json={"model": "dsv2-scripted", "messages": MESSAGES, "stream": True},
        ) as resp:
            events = await read_sse(resp)
        assert any(isinstance(e, dict) and "error" in e for e in events)
        assert events[-1] == "[DONE]"
