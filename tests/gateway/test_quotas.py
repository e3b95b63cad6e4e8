"""Quotas against a real Redis: request windows, the daily token budget with reservation and
refund, concurrent-stream slots (also after a dead replica), 429 facts, per-IP limits."""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from services.gateway.core.identity import client_ip
from services.gateway.core.quotas import Subject
from tests.gateway.conftest import (
    TEST_TIERS,
    ThreadedGateway,
    auth,
    gateway_settings,
    read_sse,
    tier,
)
from tests.gateway.scripted_backend import ScriptedBackend

BODY = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}]}
PROMPT = 3 + 1 + 2  # scripted tokenizer: one message of one word


async def test_minute_limit_429_with_headers(gateway: ThreadedGateway):
    key = gateway.create_key("t1", "tight")
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        codes = []
        for _ in range(50):
            r = await c.post(
                "/v1/chat/completions", json={**BODY, "max_tokens": 1}, headers=auth(key)
            )
            codes.append(r.status_code)
        assert codes == [200] * 50
        assert r.headers["x-ratelimit-limit-requests"] == "50"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "requests_per_minute"
        assert "50 requests per minute" in err["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        u = (await c.get("/v1/usage", headers=auth(key))).json()
        assert u["requests_per_minute"]["remaining"] == 0
        assert u["requests_per_minute"]["reset_at"] > time.time()


async def test_token_budget_never_exceeded_under_concurrent_streams(gateway: ThreadedGateway):
    gateway.backend.delay_s = 0.02  # streams overlap
    key = gateway.create_key("t2", "budget")  # 600 tokens/day, max 64 per request
    body = {**BODY, "max_tokens": 64, "stream": True}

    async def one(c: httpx.AsyncClient) -> int:
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=auth(key)) as r:
            if r.status_code != 200:
                await r.aread()
                assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_per_day"
                return 0
            events = await read_sse(r)
            assert events[-1] == "[DONE]"
            return 1

    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        admitted = sum(await asyncio.gather(*(one(c) for _ in range(30))))
        gateway.drain()
        # Each reservation is PROMPT + 64 = 70: at most 8 fit in 600 at once.
        assert 1 <= admitted
        used = (await c.get("/v1/usage", headers=auth(key))).json()["tokens_per_day"]
    # What was charged is exactly what was generated (prompt + 8 per admitted request), and
    # never more than the budget.
    assert 600 - used["remaining"] == admitted * (PROMPT + 8) <= 600
    assert len(gateway.backend.requests) == admitted


async def test_killed_stream_returns_slot_and_unused_tokens(gateway: ThreadedGateway):
    gateway.backend.delay_s = 0.1
    gateway.backend.reply_tokens = 50
    key = gateway.create_key("t3", "one_stream")
    body = {**BODY, "max_tokens": 200, "stream": True}
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=auth(key)) as r:
            assert r.status_code == 200
            # Keep the line iterator referenced: dropping it would close the response early.
            lines = r.aiter_lines()
            seen = 0
            while seen < 2:
                line = await lines.__anext__()
                if '"content": "' in line and '"content": ""' not in line:
                    seen += 1
            # While it streams, the only slot is taken.
            r2 = await c.post("/v1/chat/completions", json=body, headers=auth(key))
            assert r2.status_code == 429 and r2.json()["error"]["code"] == "concurrent_streams"
        # Connection closed mid-stream: the generation is cancelled, the slot comes back and
        # only what was generated stays charged.
        for _ in range(100):
            if gateway.backend.cancelled:
                break
            await asyncio.sleep(0.05)
        assert len(gateway.backend.cancelled) == 1
        gateway.drain()
        u = (await c.get("/v1/usage", headers=auth(key))).json()
        assert u["concurrent_streams"]["remaining"] == 1
        charged = u["tokens_per_day"]["limit"] - u["tokens_per_day"]["remaining"]
        generated = gateway.backend.generated[gateway.backend.cancelled[0]]
        assert 2 <= generated < 50
        assert charged == PROMPT + generated  # not PROMPT + 200 as reserved
        gateway.backend.delay_s = 0
        r3 = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 4}, headers=auth(key))
        assert r3.status_code == 200


async def test_dead_replicas_slot_expires(gateway: ThreadedGateway):
    """A replica that dies mid-stream never releases its lease; it expires (2 s in tests)."""
    key = gateway.create_key("t4", "one_stream")
    subject = Subject("u:t4", TEST_TIERS["one_stream"])
    gateway.call(gateway.gateway.quotas.admit([subject], 10))  # never finished
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 429 and r.json()["error"]["code"] == "concurrent_streams"
        await asyncio.sleep(gateway.settings.stream_lease_s + 0.3)
        r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 200


async def test_dead_replicas_reservation_refunded_when_its_lease_expires(
    gateway: ThreadedGateway,
):
    """A replica that dies mid-request never settles its tokens: once the lease expires, the
    next quota call for that user refunds the whole reservation (nothing was delivered)."""
    key = gateway.create_key("t5", "budget")  # 600 tokens a day
    subject = Subject("u:t5", TEST_TIERS["budget"])
    quotas = gateway.gateway.quotas
    gateway.call(quotas.admit([subject], 250))  # never finished: its replica died
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        u = (await c.get("/v1/usage", headers=auth(key))).json()
        assert u["tokens_per_day"]["remaining"] == 350
        await asyncio.sleep(gateway.settings.stream_lease_s + 0.3)
        u = (await c.get("/v1/usage", headers=auth(key))).json()
        assert u["tokens_per_day"]["remaining"] == 600


async def test_stalled_request_settles_exactly_after_its_refund(gateway: ThreadedGateway):
    """A request that outlived its lease (refunded whole meanwhile) and then ends is charged
    what it used, once, however often its finish is retried."""
    key = gateway.create_key("t6", "budget")
    subject = Subject("u:t6", TEST_TIERS["budget"])
    quotas = gateway.gateway.quotas
    lease = gateway.call(quotas.admit([subject], 250))
    await asyncio.sleep(gateway.settings.stream_lease_s + 0.3)
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        u = (await c.get("/v1/usage", headers=auth(key))).json()
        assert u["tokens_per_day"]["remaining"] == 600  # refunded as dead
        gateway.call(quotas.finish(lease, 40))
        lease.finished = False  # as if the reply to the first finish had been lost
        gateway.call(quotas.finish(lease, 40))
        u = (await c.get("/v1/usage", headers=auth(key))).json()
        assert u["tokens_per_day"]["remaining"] == 560
    # The day's audit totals agree: 250 admitted, 250 - 40 refunded on net.
    r = redis.Redis.from_url(gateway.settings.redis_url, decode_responses=True)
    (res,) = r.scan_iter("*u:t6*res:*")
    assert r.hmget(res, "admitted", "refunded") == ["250", "210"]
    r.close()


async def test_anonymous_limited_per_ip_not_per_cookie(redis_url):
    tiers = {**TEST_TIERS, "per_ip": tier("per_ip", requests_per_minute=3)}
    gw = ThreadedGateway(
        gateway_settings(redis_url, anonymous_ip_tier="per_ip"), ScriptedBackend(), tiers
    )
    try:
        codes = []
        for _ in range(4):  # a fresh client each time: clearing cookies does not help
            async with httpx.AsyncClient(base_url=gw.http_url) as c:
                r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 1})
                codes.append(r.status_code)
                if r.status_code == 429:
                    assert "this IP address" in r.json()["error"]["message"]
        assert codes == [200, 200, 200, 429]
        # X-Forwarded-For from an untrusted peer is ignored (no way around the limit).
        async with httpx.AsyncClient(base_url=gw.http_url) as c:
            r = await c.post(
                "/v1/chat/completions",
                json={**BODY, "max_tokens": 1},
                headers={"X-Forwarded-For": "203.0.113.9"},
            )
            assert r.status_code == 429
    finally:
        gw.stop()


def test_client_ip_trusts_forwarded_for_only_from_proxies():
    import ipaddress

    proxies = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_ip("203.0.113.5", "1.2.3.4", proxies) == "203.0.113.5"
    assert client_ip("10.1.1.1", "1.2.3.4", proxies) == "1.2.3.4"
    # Rightmost untrusted hop: a client cannot prepend a fake address.
    assert client_ip("10.1.1.1", "6.6.6.6, 1.2.3.4, 10.2.2.2", proxies) == "1.2.3.4"
    assert client_ip("10.1.1.1", "1.2.3.4", []) == "10.1.1.1"
