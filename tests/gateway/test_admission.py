"""Charge before work (chat.py's admission order): every request is counted and its tokens
reserved from its byte size before the model plane tokenizes anything; refusals after
admission refund the tokens; an overloaded model plane answers 503 + Retry-After within a
bounded wait; /readyz tells busy from down; anonymous callers see the tighter of their cookie's
and their IP's limits."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, auth, gateway_settings, tier
from tests.gateway.scripted_backend import ScriptedBackend

START_TIMEOUT_S = 0.5
TIERS = {
    **TEST_TIERS,
    "anon": tier("anon", requests_per_minute=10, tokens_per_day=6000, max_tokens_per_request=64),
    "anon_ip": tier("anon_ip", requests_per_minute=4, tokens_per_day=50_000),
}


@pytest.fixture(scope="module")
def module_gateway(redis_server) -> Iterator[ThreadedGateway]:
    settings = gateway_settings(
        redis_server.url,
        anonymous_tier="anon",
        anonymous_ip_tier="anon_ip",
        model_start_timeout_s=START_TIMEOUT_S,
    )
    gw = ThreadedGateway(settings, ScriptedBackend(), TIERS)
    yield gw
    gw.stop()


@pytest.fixture
def gw(module_gateway: ThreadedGateway, redis_server) -> ThreadedGateway:
    module_gateway.reset(redis_server)
    module_gateway.backend = b = ScriptedBackend()
    module_gateway.gateway.backend.inner = b
    module_gateway.gateway._model_info = None  # max_token_bytes may change per test
    return module_gateway


def chat(content: str, **kw) -> dict:
    return {"model": "dsv2-scripted", "messages": [{"role": "user", "content": content}], **kw}


def test_over_the_context_refused_after_admission_refunds_tokens(gw):
    """120 kB of words: within the byte caps, over the 4096-token context. The request is
    counted (rpm) and tokenized once; its reservation comes back whole."""
    with httpx.Client(base_url=gw.http_url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat("w " * 60_000))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert gw.backend.tokenize_calls == 1 and gw.backend.requests == []
        r = c.post("/v1/chat/completions", json=chat("hi", max_tokens=4))
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == "2"  # IP: 4 - 2 (both counted)
        # At admission only this request's reservation (2 bytes + template 64 + 4) was out:
        # the refused one had been refunded whole.
        assert r.headers["x-ratelimit-remaining-tokens"] == str(6000 - 70)
        gw.drain()
        used = r.json()["usage"]["total_tokens"]
        assert c.get("/v1/usage").json()["tokens_per_day"]["remaining"] == 6000 - used


def test_byte_length_that_proves_too_long_is_refused_without_tokenizing(gw):
    gw.backend.max_token_bytes = 16  # 120 kB / 16 > 4096 tokens
    with httpx.Client(base_url=gw.http_url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat("w " * 60_000))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "bytes" in r.json()["error"]["message"]
        assert gw.backend.tokenize_calls == 0
        # Counted all the same: the per-IP limit of 4 a minute refuses the 5th, untokenized.
        statuses = [c.post("/v1/chat/completions", json=chat("w " * 60_000)).status_code]
        statuses += [c.post("/v1/chat/completions", json=chat("w " * 60_000)).status_code]
        statuses += [c.post("/v1/chat/completions", json=chat("w " * 60_000)).status_code]
        r = c.post("/v1/chat/completions", json=chat("hi"))
    assert statuses == [400, 400, 400]
    assert r.status_code == 429 and r.json()["error"]["code"] == "requests_per_minute"
    assert "Retry-After" in r.headers and gw.backend.tokenize_calls == 0


def test_reservation_over_the_token_quota_is_refused_before_tokenizing(gw):
    """The budget tier has 600 tokens a day: 1,000 bytes + max_tokens may cost over 1,000
    tokens, so the request is refused by the token quota from its size alone."""
    key = gw.create_key("budget-user", "budget")
    with httpx.Client(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        r = c.post("/v1/chat/completions", json=chat("x" * 1000, max_tokens=8))
        assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_per_day"
        assert "this request needs 1072" in r.json()["error"]["message"]  # 1000 + 64 + 8
        assert gw.backend.tokenize_calls == 0
        r = c.post("/v1/chat/completions", json=chat("hi", max_tokens=8))
        assert r.status_code == 200 and gw.backend.tokenize_calls == 1
    used = r.json()["usage"]["total_tokens"]
    assert r.headers["x-ratelimit-remaining-tokens"] == str(600 - 74)  # while reserved
    gw.drain()
    usage = httpx.get(gw.http_url + "/v1/usage", headers=auth(key)).json()
    assert usage["tokens_per_day"]["remaining"] == 600 - used  # the rest refunded


def test_anonymous_headers_show_the_tighter_of_cookie_and_ip(gw):
    with httpx.Client(base_url=gw.http_url, timeout=30) as first:
        for _ in range(2):
            assert first.post("/v1/chat/completions", json=chat("hi")).status_code == 200
    with httpx.Client(base_url=gw.http_url, timeout=30) as fresh:  # new cookie, same IP
        r = fresh.post("/v1/chat/completions", json=chat("hi"))
    # The cookie has 9 of 10 left; the IP 1 of 4, and the IP is what refuses next.
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "4"
    assert r.headers["x-ratelimit-remaining-requests"] == "1"
    # Tokens: the cookie's 6,000 a day is tighter than the IP's 50,000.
    assert r.headers["x-ratelimit-limit-tokens"] == "6000"


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_model_plane_answers_503_within_the_bounded_wait(gw, stream):
    gw.backend.start_delay_s = 30.0  # queued behind others, for longer than anyone waits
    key = gw.create_key("overload", "internal")
    started = time.monotonic()
    with httpx.Client(base_url=gw.http_url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat("hi", stream=stream), headers=auth(key))
    waited = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_overloaded"
    assert int(r.headers["Retry-After"]) >= 1
    assert START_TIMEOUT_S <= waited < START_TIMEOUT_S + 5
    gw.drain()
    assert len(gw.backend.cancelled) == 1  # the queued generation was cancelled
    usage = httpx.get(gw.http_url + "/v1/usage", headers=auth(key)).json()
    assert usage["concurrent_streams"]["remaining"] == 256  # its stream slot came back


async def test_overloaded_model_plane_over_grpc(gw):
    gw.backend.start_delay_s = 30.0
    key = gw.create_key("overload-grpc", "internal")
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="hi")])
    started = time.monotonic()
    async with grpc.aio.insecure_channel(gw.grpc_target) as ch:
        call = chat_pb2_grpc.ChatStub(ch).Chat(req, metadata=(("authorization", f"Bearer {key}"),))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [r async for r in call]
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not start answering" in e.value.details()
    assert dict(e.value.trailing_metadata())["retry-after"]
    assert time.monotonic() - started < START_TIMEOUT_S + 5


def test_readyz_tells_busy_from_down(gw):
    with httpx.Client(base_url=gw.http_url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        # Busy: health answers slowly, but the plane answered requests just now.
        key = gw.create_key("ready", "internal")
        assert c.post("/v1/chat/completions", json=chat("hi"), headers=auth(key)).status_code == 200
        gw.backend.health_delay_s = 4.0
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["model"] == "ok"
        # Down: health fails outright.
        gw.backend.health_delay_s, gw.backend.health_error = 0.0, True
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["model"].startswith("unavailable")


def test_standing_refusal_is_answered_without_reading_the_body(gw):
    """Once an IP's request window is spent, its anonymous requests get the 429 from this
    process (no Redis, body unread: even an unparsable one), after a pause that makes a
    client looping on refusals idle. Keyed callers from the same address are not affected."""
    delay = gw.settings.repeat_refusal_delay_s
    assert delay > 0
    with httpx.Client(base_url=gw.http_url, timeout=30) as c:
        for _ in range(4):
            assert c.post("/v1/chat/completions", json=chat("hi")).status_code == 200
        first = c.post("/v1/chat/completions", json=chat("hi"))  # refused by Redis
        assert first.status_code == 429
        started = time.monotonic()
        again = c.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        waited = time.monotonic() - started
    assert again.status_code == 429 and again.json()["error"]["code"] == "requests_per_minute"
    assert 1 <= int(again.headers["Retry-After"]) <= 60
    assert waited >= delay
    key = gw.create_key("neighbour", "internal")
    r = httpx.post(gw.http_url + "/v1/chat/completions", json=chat("hi"), headers=auth(key))
    assert r.status_code == 200


async def test_caller_leaving_during_the_wait_cancels_the_generation(gw):
    gw.backend.start_delay_s = 30.0
    key = gw.create_key("impatient", "internal")
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="hi")])
    async with grpc.aio.insecure_channel(gw.grpc_target) as ch:
        call = chat_pb2_grpc.ChatStub(ch).Chat(
            req, metadata=(("authorization", f"Bearer {key}"),), timeout=START_TIMEOUT_S / 3
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [r async for r in call]
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gw.drain()  # waits (up to 5 s) for the turn's task: it ends only if it was cancelled
    assert len(gw.backend.cancelled) == 1 and not gw.backend.completed


def test_session_turn_is_admitted_before_its_history_is_tokenized(gw):
    gw.backend.max_token_bytes = 16  # (read once: the gateway caches the model's info)
    budget = gw.create_key("session-user", "budget")  # 600 tokens a day
    with httpx.Client(base_url=gw.http_url, timeout=30, headers=auth(budget)) as c:
        sid = c.post("/v1/sessions", json={"title": "t"}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "x" * 1000, "max_tokens": 8})
        assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_per_day"
    internal = gw.create_key("session-internal", "internal")
    with httpx.Client(base_url=gw.http_url, timeout=30, headers=auth(internal)) as c:
        sid = c.post("/v1/sessions", json={"title": "t"}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "w " * 60_000})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "content"
        assert c.get(f"/v1/sessions/{sid}").json()["messages"] == []
    assert gw.backend.tokenize_calls == 0


def test_refusal_after_admission_is_counted_once_with_a_cached_key(gw):
    """The fast lane looks a refused cached key up again and retries, but not a refusal that
    came after admission: that one was counted, and must be counted once."""
    key = gw.create_key("cached", "tight")  # 50 requests a minute
    with httpx.Client(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        assert c.post("/v1/chat/completions", json=chat("hi")).status_code == 200  # cached now
        r = c.post("/v1/chat/completions", json=chat("w " * 60_000))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        usage = c.get("/v1/usage").json()
    assert usage["requests_per_minute"]["remaining"] == 48
    assert gw.backend.tokenize_calls == 2
