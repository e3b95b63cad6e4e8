"""Redis stopped and restarted under traffic: clear 503s meanwhile, success afterwards, with
the same gateway (no restart); optional fail-open for quotas only."""

from __future__ import annotations

import asyncio

import httpx

from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, gateway_settings, read_sse
from tests.gateway.scripted_backend import ScriptedBackend

BODY = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _traffic_round(c: httpx.AsyncClient) -> list[int]:
    """A page-like round: create a session, run a turn, read usage."""
    codes = []
    r = await c.post("/v1/sessions", json={})
    codes.append(r.status_code)
    if r.status_code == 201:
        async with c.stream(
            "POST", f"/v1/sessions/{r.json()['id']}/messages", json={"content": "hello"}
        ) as resp:
            codes.append(resp.status_code)
            if resp.status_code == 200:
                assert (await read_sse(resp))[-1]["type"] == "done"
            else:
                await resp.aread()
    r = await c.get("/v1/usage")
    codes.append(r.status_code)
    return codes


async def test_outage_gives_503_then_recovers_without_restart(own_redis_server):
    gw = ThreadedGateway(gateway_settings(own_redis_server.url), ScriptedBackend(), TEST_TIERS)
    open_gw = ThreadedGateway(
        gateway_settings(own_redis_server.url, quota_fail_open=True), ScriptedBackend(), TEST_TIERS
    )
    try:
        async with (
            httpx.AsyncClient(base_url=gw.http_url, timeout=10) as c,
            httpx.AsyncClient(base_url=open_gw.http_url, timeout=10) as c_open,
        ):
            assert set(await _traffic_round(c)) == {200, 201}
            # Traffic keeps flowing while Redis goes away.
            own_redis_server.stop()
            for _ in range(3):
                codes = await _traffic_round(c)
                assert set(codes) == {503}, codes
            r = await c.get("/v1/sessions")
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "redis_unavailable" and "Redis" in err["message"]
            assert r.headers["retry-after"]
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
            assert (await c.get("/healthz")).status_code == 200
            # Fail-open applies to quotas only: chat completions pass, sessions do not.
            assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 503
            assert (await c_open.post("/v1/chat/completions", json=BODY)).status_code == 200
            assert (await c_open.post("/v1/sessions", json={})).status_code == 503

            own_redis_server.start()
            # The pool reconnects by itself: the next requests succeed.
            for _ in range(50):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert set(await _traffic_round(c)) == {200, 201}
            assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200
            metrics = (await c.get("/metrics")).text
            assert "dsv2_gateway_redis_unavailable_total" in metrics
    finally:
        gw.stop()
        open_gw.stop()
