"""Sessions API as the web page uses it: anonymous cookie identity, CRUD, owner-only access,
streamed turns stored server-side, and /v1/usage."""

from __future__ import annotations

import httpx

from tests.gateway.conftest import auth, read_sse


async def test_anonymous_cookie_set_once_and_reused(client: httpx.AsyncClient):
    r = await client.post("/v1/sessions", json={"title": "first"})
    assert r.status_code == 201, r.text
    cookie = r.cookies.get("dsv2_anon")
    assert cookie and "HttpOnly" in r.headers["set-cookie"]
    # httpx keeps the cookie: the same anonymous user sees its session, no new cookie issued.
    r2 = await client.get("/v1/sessions")
    assert "set-cookie" not in r2.headers
    assert [s["id"] for s in r2.json()["data"]] == [r.json()["id"]]


async def test_tampered_cookie_is_replaced_with_a_new_identity(client: httpx.AsyncClient):
    r = await client.post("/v1/sessions", json={})
    sid = r.json()["id"]
    good = client.cookies.get("dsv2_anon")
    version, anon_id, sig = good.split(".")
    forged = f"{version}.{anon_id[:-1]}{'A' if anon_id[-1] != 'A' else 'B'}.{sig}"
    client.cookies.clear()
    client.cookies.set("dsv2_anon", forged)
    r2 = await client.get(f"/v1/sessions/{sid}")
    assert r2.status_code == 404  # a forged id owns nothing
    new = r2.cookies.get("dsv2_anon")
    assert new and new != forged and new != good


async def test_session_crud_and_turn(client: httpx.AsyncClient, gateway):
    r = await client.post("/v1/sessions", json={})
    assert r.status_code == 201
    s = r.json()
    assert set(s) == {"id", "title", "created_at", "updated_at"} and s["title"] == ""
    async with client.stream(
        "POST", f"/v1/sessions/{s['id']}/messages", json={"content": "hello there friend"}
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(resp)
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    reply = gateway.backend.expected_reply("hello there friend")
    assert "".join(deltas) == reply
    assert done["usage"]["completion_tokens"] == 8
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 8
    detail = (await client.get(f"/v1/sessions/{s['id']}")).json()
    assert detail["title"] == "hello there friend"
    assert [(m["role"], m["content"]) for m in detail["messages"]] == [
        ("user", "hello there friend"),
        ("assistant", reply),
    ]
    assert detail["messages"][1]["id"] == done["message_id"]
    assert (await client.delete(f"/v1/sessions/{s['id']}")).status_code == 204
    assert (await client.get(f"/v1/sessions/{s['id']}")).status_code == 404
    assert (await client.get("/v1/sessions")).json()["data"] == []


async def test_list_newest_first(client: httpx.AsyncClient):
    ids = [(await client.post("/v1/sessions", json={"title": t})).json()["id"] for t in "abc"]
    # A turn in the oldest session moves it to the top.
    async with client.stream("POST", f"/v1/sessions/{ids[0]}/messages", json={"content": "x"}) as r:
        await read_sse(r)
    listed = [s["id"] for s in (await client.get("/v1/sessions")).json()["data"]]
    assert listed == [ids[0], ids[2], ids[1]]


async def test_sessions_isolated_between_users(gateway):
    key_a, key_b = gateway.create_key("alice"), gateway.create_key("bob")
    async with httpx.AsyncClient(base_url=gateway.http_url) as c:
        sid = (await c.post("/v1/sessions", json={"title": "a"}, headers=auth(key_a))).json()["id"]
        for method, path, body in [
            ("GET", f"/v1/sessions/{sid}", None),
            ("DELETE", f"/v1/sessions/{sid}", None),
            ("POST", f"/v1/sessions/{sid}/messages", {"content": "steal"}),
        ]:
            r = await c.request(method, path, json=body, headers=auth(key_b))
            assert r.status_code == 404, (method, r.text)
            assert r.json()["error"]["type"] == "not_found_error"
        assert (await c.get("/v1/sessions", headers=auth(key_b))).json()["data"] == []
        # An anonymous caller cannot see it either, and alice still has it intact.
        assert (await c.get(f"/v1/sessions/{sid}")).status_code == 404
        r = await c.get(f"/v1/sessions/{sid}", headers=auth(key_a))
        assert r.status_code == 200 and r.json()["messages"] == []


async def test_usage_reports_quota(client: httpx.AsyncClient):
    u = (await client.get("/v1/usage")).json()
    assert u["tier"] == "free" and u["user_id"].startswith("anon:")
    assert u["requests_per_minute"] == {
        "limit": 1000,
        "remaining": 1000,
        "reset_at": u["requests_per_minute"]["reset_at"],
    }
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    async with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "hi"}) as r:
        await read_sse(r)
    u2 = (await client.get("/v1/usage")).json()
    assert u2["requests_per_minute"]["remaining"] == 999
    assert u2["concurrent_streams"]["remaining"] == 50
    assert u2["tokens_per_day"]["limit"] is None  # unlimited in this tier


async def test_bad_input_gets_clear_400(client: httpx.AsyncClient):
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    r = await client.post(f"/v1/sessions/{sid}/messages", json={"content": ""})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "content" and "content" in err["message"]
    r = await client.post(
        f"/v1/sessions/{sid}/messages",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = await client.post(f"/v1/sessions/{sid}/messages", content=b"content=hi")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = await client.post(
        f"/v1/sessions/{sid}/messages", json={"content": "x", "max_tokens": 99999}
    )
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = await client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("No route")


async def test_session_ttl_follows_tier(client: httpx.AsyncClient, gateway, redis_url):
    import redis

    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    async with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "hi"}) as r:
        await read_sse(r)
    r = redis.Redis.from_url(redis_url)
    ttl = gateway.gateway.tiers["free"].session_ttl_s
    for key in (f"dsv2:sess:{sid}", f"dsv2:sess:{sid}:msgs"):
        assert ttl - 5 <= r.ttl(key) <= ttl
    pro_key = gateway.create_key("paying", "pro")
    sid2 = (await client.post("/v1/sessions", json={}, headers=auth(pro_key))).json()["id"]
    assert r.ttl(f"dsv2:sess:{sid2}") > ttl  # pro keeps sessions for 90 days


async def test_health_ready_metrics(client: httpx.AsyncClient):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "model": "ok"}
    await client.post("/v1/sessions", json={})
    text = (await client.get("/metrics")).text
    assert (
        'dsv2_gateway_http_requests_total{method="POST",route="/v1/sessions",status="201"}' in text
    )
