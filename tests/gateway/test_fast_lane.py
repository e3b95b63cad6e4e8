"""POST /v1/chat/completions through the fast lane (the default) and through FastAPI's routing
(DSV2_HTTP_FAST_LANE=false) gives the same answers: statuses, error bodies, headers, cookies,
metrics. The lane exists only to save CPU; a client must not be able to tell."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, gateway_settings, read_sse
from tests.gateway.scripted_backend import ScriptedBackend

GOOD = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
JSON = {"content-type": "application/json"}

# (name, headers, body bytes or JSON object); every case runs with a valid key unless it sets
# its own Authorization header.
CASES = [
    ("not json", JSON, b'{"model": "x", '),
    ("no content-type", {}, b'{"model": "dsv2-scripted"}'),
    ("text/plain", {"content-type": "text/plain"}, b'{"model": "dsv2-scripted"}'),
    ("json with charset", {"content-type": "application/json; charset=utf-8"}, GOOD),
    ("vendor +json", {"content-type": "application/vnd.api+json"}, GOOD),
    ("empty body", JSON, b""),
    ("array body", JSON, [1, 2]),
    ("missing messages", JSON, {"model": "dsv2-scripted"}),
    ("bad role and max_tokens", JSON, {**GOOD, "messages": [{"role": "x", "content": "a"}], "max_tokens": 0}),
    ("unknown model", JSON, {**GOOD, "model": "gpt-9"}),
    ("too many stops", JSON, {**GOOD, "stop": ["a", "b", "c", "d", "e"]}),
    ("max_tokens over tier", JSON, {**GOOD, "max_tokens": 5000}),
    ("last message from assistant", JSON, {**GOOD, "messages": [{"role": "assistant", "content": "a"}]}),
    ("bad key and bad body", {**JSON, "authorization": "Bearer nope"}, {"model": ""}),
    ("malformed authorization", {**JSON, "authorization": "Basic abc"}, GOOD),
    ("invalid json and bad key", {**JSON, "authorization": "Bearer nope"}, b"{"),
    ("ok", JSON, GOOD),
    ("ok, content parts", JSON, {**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
]  # fmt: skip


@pytest.fixture(scope="module")
def routed_gateway(redis_server) -> Iterator[ThreadedGateway]:
    gw = ThreadedGateway(
        gateway_settings(redis_server.url, http_fast_lane=False), ScriptedBackend(), TEST_TIERS
    )
    yield gw
    gw.stop()


def _normal(r: httpx.Response) -> tuple:
    """What a client sees, less what differs per request (ids, timestamps, quota figures)."""
    body = r.json()
    for k in ("id", "created"):
        body.pop(k, None)
    names = sorted(h for h in r.headers if h.startswith("x-ratelimit") or h in ("retry-after",))
    names += ["www-authenticate"] if "www-authenticate" in r.headers else []
    return r.status_code, r.headers.get("content-type"), body, names


async def _send(gw: ThreadedGateway, key: str, headers: dict, body) -> httpx.Response:
    h = {"authorization": f"Bearer {key}", **headers}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        return await c.post("/v1/chat/completions", headers=h, content=content)


@pytest.mark.parametrize("name,headers,body", CASES, ids=[c[0] for c in CASES])
async def test_same_answers_with_and_without_the_lane(
    gateway: ThreadedGateway, routed_gateway: ThreadedGateway, name, headers, body
):
    assert gateway.settings.http_fast_lane and not routed_gateway.settings.http_fast_lane
    key = gateway.create_key("lane-user", "free")  # one Redis: valid for both
    fast = await _send(gateway, key, headers, body)
    routed = await _send(routed_gateway, key, headers, body)
    assert _normal(fast) == _normal(routed), name
    if name.startswith("ok"):
        assert fast.status_code == 200 and fast.json()["choices"][0]["message"]["content"]
        assert "x-ratelimit-remaining-requests" in fast.headers


async def test_anonymous_cookie_streaming_and_metrics(
    gateway: ThreadedGateway, routed_gateway: ThreadedGateway
):
    for gw in (gateway, routed_gateway):
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
            # No key: an anonymous identity, whose cookie comes back with the answer.
            r = await c.post("/v1/chat/completions", json=GOOD)
            assert r.status_code == 200 and "dsv2_anon=" in r.headers["set-cookie"]
            async with c.stream("POST", "/v1/chat/completions", json={**GOOD, "stream": True}) as s:
                assert s.status_code == 200
                assert s.headers["content-type"].startswith("text/event-stream")
                events = await read_sse(s)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"]
            metrics = (await c.get("/metrics")).text
            assert any(
                'route="/v1/chat/completions"' in m and 'status="200"' in m
                for m in metrics.splitlines()
                if m.startswith("dsv2_gateway_http_requests_total")
            ), gw.settings.http_fast_lane


async def test_other_methods_and_paths_are_untouched(gateway: ThreadedGateway):
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        r = await c.get("/v1/chat/completions")
        assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions/", json=GOOD)
        assert r.status_code in (307, 404)


async def test_cached_key_revoked_or_retiered_takes_effect_at_once(gateway: ThreadedGateway):
    """The lane reuses key lookups (DSV2_API_KEY_CACHE_S), but admission confirms the key in
    the same Lua call: a tier change or a revocation applies to the very next request."""
    keys = gateway.gateway.keys
    key, record = gateway.call(keys.create("cache-user", "free"))
    h = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        assert (await c.post("/v1/chat/completions", json=GOOD, headers=h)).status_code == 200
        assert keys.cached(key)[1] is not None  # the next requests take the cached identity
        r = await c.post("/v1/chat/completions", json={**GOOD, "max_tokens": 100}, headers=h)
        assert r.status_code == 200  # free tier here: up to 256 per request

        gateway.call(keys.set_user_tier("cache-user", "budget"))  # 64 per request, 600/day
        r = await c.post("/v1/chat/completions", json={**GOOD, "max_tokens": 100}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
        r = await c.post("/v1/chat/completions", json=GOOD, headers=h)
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == "600"

        assert gateway.call(keys.revoke(record.key_id))
        r = await c.post("/v1/chat/completions", json=GOOD, headers=h)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        # A cached key revoked, and a body that is wrong too: the 401 goes first, as without
        # the cache.
        key2, record2 = gateway.call(keys.create("cache-user", "free"))
        h2 = {"authorization": f"Bearer {key2}"}
        assert (await c.post("/v1/chat/completions", json=GOOD, headers=h2)).status_code == 200
        assert gateway.call(keys.revoke(record2.key_id)) and keys.cached(key2)[1] is not None
        r = await c.post("/v1/chat/completions", json={"model": ""}, headers=h2)
        assert r.status_code == 401


async def test_fail_open_does_not_skip_the_key_check(own_redis_server):
    """With DSV2_QUOTA_FAIL_OPEN and Redis down, a key known only from the cache cannot be
    confirmed: 503, as an uncached lookup gives; anonymous traffic still passes."""
    gw = ThreadedGateway(
        gateway_settings(own_redis_server.url, quota_fail_open=True), ScriptedBackend(), TEST_TIERS
    )
    try:
        h = {"authorization": f"Bearer {gw.create_key('fail-open-user', 'free')}"}
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
            assert (await c.post("/v1/chat/completions", json=GOOD, headers=h)).status_code == 200
            own_redis_server.stop()
            r = await c.post("/v1/chat/completions", json=GOOD, headers=h)
            assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable"
            assert (await c.post("/v1/chat/completions", json=GOOD)).status_code == 200
    finally:
        gw.stop()
