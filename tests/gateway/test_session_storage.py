"""Bounded storage per identity, on real Redis servers: what one anonymous caller can store is
capped (sessions per user, messages and bytes per session) however fast it creates sessions;
session creation is rate-limited per user and per IP; listing pages through every session; a
turn that fails stores nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import httpx
import pytest
import redis

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, gateway_settings, read_sse, tier
from tests.gateway.scripted_backend import ScriptedBackend
from tests.support.redis_fixtures import RedisServer

MAX_SESSIONS = 5
MAX_BYTES = 30_000
MAX_MESSAGES = 6
PROMPT = "p" * 20_000  # two thirds of a session's bytes, in the system prompt alone

TIERS = {
    **TEST_TIERS,
    # Anonymous callers: storage capped, creation limited per identity...
    "capped": tier(
        "capped",
        max_sessions=MAX_SESSIONS,
        max_messages_per_session=MAX_MESSAGES,
        max_session_bytes=MAX_BYTES,
        sessions_per_minute=1000,
        requests_per_minute=1000,
    ),
    # ... and per client IP (the tier of anonymous traffic per address).
    "capped_ip": tier("capped_ip", sessions_per_minute=1000),
    "lister": tier("lister", max_sessions=1000),
}


@pytest.fixture(scope="module")
def capped_gateway(redis_server) -> Iterator[ThreadedGateway]:
    settings = gateway_settings(
        redis_server.url, anonymous_tier="capped", anonymous_ip_tier="capped_ip"
    )
    gw = ThreadedGateway(settings, ScriptedBackend(), TIERS)
    yield gw
    gw.stop()


@pytest.fixture
def capped(capped_gateway: ThreadedGateway, redis_server) -> ThreadedGateway:
    capped_gateway.reset(redis_server)
    b = capped_gateway.backend
    b.reply_tokens, b.delay_s, b.fail_after = 8, 0.0, None
    b.requests.clear()
    return capped_gateway


def _identity_keys(r: redis.Redis, owner: str) -> list[str]:
    """Every session key of `owner` in Redis: its index and each listed session's keys."""
    index = f"dsv2:user:{owner}:sessions"
    keys = [index] if r.exists(index) else []
    for k in r.scan_iter("dsv2:sess:*"):
        base = k.split(":msgs")[0].split(":turn")[0]
        if r.hget(base, "owner") == owner:
            keys.append(k)
    return keys


async def test_concurrent_creates_cannot_grow_one_identity_past_its_cap(
    capped: ThreadedGateway, redis_server
):
    r = redis.Redis(port=redis_server.port, decode_responses=True)
    async with httpx.AsyncClient(
        base_url=capped.http_url, timeout=60, limits=httpx.Limits(max_connections=50)
    ) as c:
        first = await c.post("/v1/sessions", json={})  # gets the identity's cookie
        assert first.status_code == 201

        async def create(i: int) -> int:
            resp = await c.post("/v1/sessions", json={"title": f"t{i}", "system_prompt": PROMPT})
            return resp.status_code

        codes = await asyncio.gather(*(create(i) for i in range(150)))
        assert set(codes) == {201}, codes  # the oldest make room: never refused, never a 5xx
        listed = (await c.get("/v1/sessions")).json()
        owner = "anon:" + c.cookies["dsv2_anon"].split(".")[1]
    # Exactly the cap survives, the newest ones (the oldest were deleted first).
    assert len(listed["data"]) == MAX_SESSIONS and not listed["has_more"]
    assert r.zcard(f"dsv2:user:{owner}:sessions") == MAX_SESSIONS
    keys = _identity_keys(r, owner)
    metas = [k for k in keys if k.count(":") == 2]
    assert len(metas) == MAX_SESSIONS
    # Bytes: what Redis itself reports (MEMORY USAGE) for this identity's keys stays within
    # the cap (bytes per session x sessions) plus Redis's per-key overhead, not 150 x 20 KB.
    stored = sum(r.memory_usage(k) or 0 for k in keys)
    assert stored <= MAX_SESSIONS * (MAX_BYTES + 2_048), stored
    # And the whole Redis holds nothing more than that and the (small) creation counters.
    everything = sum(r.memory_usage(k) or 0 for k in r.scan_iter("*"))
    assert everything <= stored + 64_000, everything


async def test_session_full_is_409_before_any_work(capped: ThreadedGateway):
    async with httpx.AsyncClient(base_url=capped.http_url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={"system_prompt": PROMPT})).json()["id"]
        # Bytes: the system prompt leaves 10,000 bytes; a 12,000-byte message does not fit.
        resp = await c.post(f"/v1/sessions/{sid}/messages", json={"content": "w " * 6_000})
        assert resp.status_code == 409, resp.text
        err = resp.json()["error"]
        assert err["code"] == "session_full" and "bytes" in err["message"]
        # Messages: 6 per session = 3 turns; the fourth is refused.
        for i in range(3):
            async with c.stream(
                "POST", f"/v1/sessions/{sid}/messages", json={"content": f"turn {i}"}
            ) as s:
                assert s.status_code == 200
                assert (await read_sse(s))[-1]["finish_reason"] == "stop"
        requests_before = len(capped.backend.requests)
        usage_before = (await c.get("/v1/usage")).json()
        resp = await c.post(f"/v1/sessions/{sid}/messages", json={"content": "one more"})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "session_full"
        assert "6 messages" in resp.json()["error"]["message"]
        # Refused before the model plane or the quotas saw it; the history is untouched.
        assert len(capped.backend.requests) == requests_before
        assert (await c.get("/v1/usage")).json()["requests_per_minute"] == usage_before[
            "requests_per_minute"
        ]
        msgs = (await c.get(f"/v1/sessions/{sid}")).json()["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
        # A system prompt that alone is over the byte cap can never hold a turn: 400.
        resp = await c.post("/v1/sessions", json={"system_prompt": "x" * (MAX_BYTES + 1)})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "session_too_large"


async def test_session_creation_rate_limited_per_ip_across_cookies(capped: ThreadedGateway):
    # A tighter IP tier for this test only: 3 creations a minute per address.
    ip_tier = capped.gateway.identity.tiers["capped_ip"]
    capped.gateway.identity.tiers["capped_ip"] = ip_tier.model_copy(
        update={"sessions_per_minute": 3}
    )
    try:
        codes = []
        async with httpx.AsyncClient(base_url=capped.http_url, timeout=30) as first:
            for _ in range(2):
                codes.append((await first.post("/v1/sessions", json={})).status_code)
            # A new cookie (a new anonymous identity) each time: the IP's limit still holds.
            for _ in range(3):
                async with httpx.AsyncClient(base_url=capped.http_url, timeout=30) as c:
                    last = await c.post("/v1/sessions", json={})
                    codes.append(last.status_code)
            assert codes == [201, 201, 201, 429, 429]
            err = last.json()["error"]
            assert err["code"] == "sessions_per_minute" and "IP address" in err["message"]
            assert 1 <= int(last.headers["retry-after"]) <= 60
            # Chat requests are counted apart: creating sessions used none of them.
            rpm = (await first.get("/v1/usage")).json()["requests_per_minute"]
            assert rpm["limit"] == 1000 and rpm["remaining"] == 1000
    finally:
        capped.gateway.identity.tiers["capped_ip"] = ip_tier


async def test_listing_pages_through_every_session(capped: ThreadedGateway):
    key = capped.create_key("many", "lister")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=capped.http_url, timeout=60, limits=httpx.Limits(max_connections=20)
    ) as c:
        # Concurrent creates: many share a millisecond, so the cursor must break ties.
        made = await asyncio.gather(
            *(c.post("/v1/sessions", json={"title": str(i)}, headers=headers) for i in range(230))
        )
        ids = {m.json()["id"] for m in made}
        seen: list[str] = []
        after, pages = None, 0
        while True:
            params = {"limit": 50, **({"after": after} if after else {})}
            page = (await c.get("/v1/sessions", params=params, headers=headers)).json()
            pages += 1
            seen += [s["id"] for s in page["data"]]
            if pages == 2:  # deleting already-listed sessions between pages skips nothing
                for sid in seen[:10]:
                    await c.delete(f"/v1/sessions/{sid}", headers=headers)
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            after = page["next_cursor"]
        assert len(seen) == len(set(seen)) == 230 and set(seen) == ids
        assert pages == 5
        # Newest first.
        firsts = (await c.get("/v1/sessions", params={"limit": 3}, headers=headers)).json()
        stamps = [s["updated_at"] for s in firsts["data"]]
        assert stamps == sorted(stamps, reverse=True)
        bad = await c.get("/v1/sessions", params={"after": "nonsense"}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


async def test_failed_turn_stores_nothing(capped: ThreadedGateway):
    async with httpx.AsyncClient(base_url=capped.http_url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        capped.backend.fail_after = 0  # the model plane fails before any text
        for _ in range(3):
            async with c.stream(
                "POST", f"/v1/sessions/{sid}/messages", json={"content": "lost question"}
            ) as s:
                done = (await read_sse(s))[-1]
            assert done["finish_reason"] == "error" and done["message_id"] is None
        assert (await c.get(f"/v1/sessions/{sid}")).json()["messages"] == []
        capped.backend.fail_after = None
        async with c.stream(
            "POST", f"/v1/sessions/{sid}/messages", json={"content": "real question"}
        ) as s:
            assert (await read_sse(s))[-1]["finish_reason"] == "stop"
        # The prompt the model saw holds no trace of the failed turns.
        sent = list(capped.backend.requests[-1].messages.messages)
        assert [(m.role, m.content) for m in sent] == [("user", "real question")]
        msgs = (await c.get(f"/v1/sessions/{sid}")).json()["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"]


@pytest.fixture
def two_redis() -> Iterator[tuple[RedisServer, RedisServer]]:
    """The deployed layout (embedded and chart): API keys and quotas in a `noeviction` Redis,
    sessions in an `allkeys-lru` Redis whose maxmemory leaves room for ~100 sessions only."""
    main, sessions = RedisServer(), RedisServer()
    main.start()
    sessions.start()
    try:
        r = redis.Redis(port=sessions.port)
        cap = r.info("memory")["used_memory"] + 2_000_000
        r.config_set("maxmemory", cap)
        r.config_set("maxmemory-policy", "allkeys-lru")
        r.close()
        m = redis.Redis(port=main.port)
        m.config_set("maxmemory-policy", "noeviction")
        m.close()
        yield main, sessions
    finally:
        main.close()
        sessions.close()


async def test_quota_and_key_data_survive_session_memory_pressure(two_redis):
    main, sessions = two_redis
    settings = gateway_settings(main.url, sessions_redis_url=sessions.url)
    gw = ThreadedGateway(settings, ScriptedBackend(), {**TIERS, "free": TIERS["lister"]})
    try:
        key = gw.create_key("payer", "tight")  # 50 requests a minute
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "model": "dsv2-scripted",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        async with httpx.AsyncClient(
            base_url=gw.http_url, timeout=60, limits=httpx.Limits(max_connections=20)
        ) as c:
            for _ in range(3):
                assert (await c.post("/v1/chat/completions", json=body, headers=headers)).is_success
            keep = (await c.post("/v1/sessions", json={}, headers=headers)).json()["id"]
            m = redis.Redis(port=main.port, decode_responses=True)
            main_keys_before = {k: m.type(k) for k in m.scan_iter("*")}

            # ~6 MB of sessions into a 2 MB budget, from one anonymous identity.
            async def create(i: int) -> int:
                resp = await c.post("/v1/sessions", json={"title": str(i), "system_prompt": PROMPT})
                return resp.status_code

            codes = await asyncio.gather(*(create(i) for i in range(300)))
            assert set(codes) == {201}, codes  # evicted, never refused, never a 5xx
            s = redis.Redis(port=sessions.port)
            mem = s.info("memory")
            assert s.info("stats")["evicted_keys"] > 0
            assert mem["used_memory"] <= mem["maxmemory"] * 1.05

            # Nothing of the main Redis was evicted or lost: same keys, same counters.
            assert m.info("stats")["evicted_keys"] == 0
            assert {k: m.type(k) for k in m.scan_iter("*")} == main_keys_before
            u = (await c.get("/v1/usage", headers=headers)).json()
            assert u["requests_per_minute"]["remaining"] == 50 - 3
            # ... and the key still works; the listing copes with evicted sessions.
            assert (await c.post("/v1/chat/completions", json=body, headers=headers)).is_success
            listing = await c.get("/v1/sessions")
            assert listing.status_code == 200 and 0 < len(listing.json()["data"]) < 300
            got = await c.get(f"/v1/sessions/{keep}", headers=headers)
            assert got.status_code in (200, 404)  # evicted or not, never an error
            ready = (await c.get("/readyz")).json()
            assert ready["checks"]["sessions_redis"] == "ok"
            m.close()
            s.close()
    finally:
        gw.stop()


async def test_one_shared_noeviction_redis_refuses_sessions_cleanly_when_full(
    own_redis_server: RedisServer,
):
    """The fallback layout (one external Redis, `noeviction`): past maxmemory, new sessions
    are refused with 503 `session_store_full` (not a 500) and nothing stored is lost."""
    settings = gateway_settings(own_redis_server.url)
    gw = ThreadedGateway(settings, ScriptedBackend(), {**TIERS, "free": TIERS["lister"]})
    try:
        key = gw.create_key("payer", "tight")
        r = redis.Redis(port=own_redis_server.port, decode_responses=True)
        before = {k: r.type(k) for k in r.scan_iter("*")}
        r.config_set("maxmemory", r.info("memory")["used_memory"] + 500_000)
        r.config_set("maxmemory-policy", "noeviction")
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=60) as c:
            codes = []
            for _ in range(60):
                resp = await c.post("/v1/sessions", json={"system_prompt": PROMPT})
                codes.append(resp.status_code)
                if resp.status_code != 201:
                    break
            assert codes[-1] == 503 and resp.json()["error"]["code"] == "session_store_full"
            assert "retry-after" in resp.headers
            listing = await c.get("/v1/sessions", headers={"Authorization": f"Bearer {key}"})
            assert listing.status_code == 200
        assert r.info("stats")["evicted_keys"] == 0
        after = {k: r.type(k) for k in r.scan_iter("*")}
        assert before.items() <= after.items()  # every key/quota key still there
        r.close()
    finally:
        gw.stop()


async def test_grpc_list_sessions_pages_with_the_same_cursor(capped: ThreadedGateway):
    key = capped.create_key("grpc-lister", "lister")
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(capped.grpc_target) as ch:
        stub = chat_pb2_grpc.ChatStub(ch)
        made = {
            (await stub.CreateSession(cpb.CreateSessionRequest(title=str(i)), metadata=md)).id
            for i in range(12)
        }
        seen, after, pages = [], "", 0
        while True:
            page = await stub.ListSessions(
                cpb.ListSessionsRequest(limit=5, after=after), metadata=md
            )
            pages += 1
            seen += [s.id for s in page.sessions]
            if not page.has_more:
                assert page.next_cursor == ""
                break
            after = page.next_cursor
        assert pages == 3 and len(seen) == 12 and set(seen) == made
        for bad in (
            cpb.ListSessionsRequest(limit=101),
            cpb.ListSessionsRequest(after="not-a-cursor"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListSessions(bad, metadata=md)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
