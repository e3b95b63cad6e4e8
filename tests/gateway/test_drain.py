"""Graceful drain: SIGTERM to a real gateway PROCESS during 10 streams (OpenAI SSE, sessions
SSE and gRPC, over a slow scripted model plane in a process of its own, a test double for Ray
Serve's ingress). Streams that can finish within the grace period finish; the others end with
a final "server restarting" error event / UNAVAILABLE status; new requests get 503 meanwhile;
the process exits by itself and leaves no stream slot, turn lock or half-stored turn behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.backends.redis_store import Keyspace, make_redis
from services.gateway.core.keys import KeyStore
from services.gateway.settings import Settings
from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.test_multi_process import _stop, _wait_http
from tests.support.redis_fixtures import free_port

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 3.0
TOKEN_DELAY_S = 0.05
SHORT, LONG = 10, 200  # max_tokens: 0.5 s (finishes within the grace) / 10 s (does not)
TIERS = {
    "drain": {
        "requests_per_minute": 0,
        "requests_per_day": 0,
        "tokens_per_day": 0,
        "concurrent_streams": 50,
        "max_tokens_per_request": 256,
        "session_ttl_days": 1,
    }
}


async def _create_key(redis_url: str) -> str:
    client = make_redis(Settings(redis_url=redis_url))
    try:
        key, _ = await KeyStore(client, Keyspace("dsv2:")).create("drainer", "drain")
    finally:
        await client.aclose()
    return key


@dataclass
class Stack:
    url: str
    grpc_target: str
    gateway: subprocess.Popen


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    """A slow scripted model plane and a gateway, each a process of its own."""
    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text(yaml.safe_dump({"tiers": TIERS}))
    model = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.scripted_backend", "--delay-s", str(TOKEN_DELAY_S),
         "--reply-tokens", str(LONG)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = [model]
    try:
        model_port = int(model.stdout.readline())
        port, grpc_port = free_port(), free_port()
        env = {
            **os.environ,
            "DSV2_REDIS_URL": redis_url,
            "DSV2_TIERS_FILE": str(tiers_file),
            "DSV2_COOKIE_SECRET": "drain-secret",
            "DSV2_MODEL_TARGET": f"127.0.0.1:{model_port}",
            "DSV2_DRAIN_GRACE_S": str(GRACE_S),
        }
        gateway = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway", "--port", str(port),
             "--grpc-port", str(grpc_port), "--log-level", "warning"],
            cwd=REPO, env=env,
        )  # fmt: skip
        procs.append(gateway)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, gateway)
        yield Stack(url, f"127.0.0.1:{grpc_port}", gateway)
    finally:
        for p in reversed(procs):
            _stop(p)


async def test_sigterm_during_ten_streams(stack: Stack, redis_url: str):
    key = await _create_key(redis_url)
    await _run_drain(stack.url, stack.grpc_target, key, stack.gateway, redis_url)


async def _run_drain(
    url: str, grpc_target: str, key: str, gateway: subprocess.Popen, redis_url: str
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    md = (("authorization", f"Bearer {key}"),)
    started = [asyncio.Event() for _ in range(10)]
    limits = httpx.Limits(max_connections=20)
    async with (
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c,
        grpc.aio.insecure_channel(grpc_target) as ch,
    ):
        stub = chat_pb2_grpc.ChatStub(ch)
        sids = [
            (await c.post("/v1/sessions", json={}, headers=headers)).json()["id"] for _ in "abc"
        ]

        async def openai(i: int, max_tokens: int) -> dict:
            body = {
                "model": "dsv2-scripted",
                "messages": [{"role": "user", "content": f"stream {i}"}],
                "max_tokens": max_tokens,
                "stream": True,
            }
            async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status_code == 200
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                        events.append(data if data == "[DONE]" else json.loads(data))
                        if '"content": "reply' in line:
                            started[i].set()
            assert events[-1] == "[DONE]", events[-3:]
            last = events[-2]
            if "error" in last:
                return {"kind": "error", "code": last["error"]["code"], "msg": last["error"]}
            assert last["choices"][0]["finish_reason"] == "length"
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
            return {"kind": "complete", "tokens": len(text.split())}

        async def session_turn(i: int, sid: str, max_tokens: int) -> dict:
            body = {"content": f"turn {i}", "max_tokens": max_tokens}
            async with c.stream(
                "POST", f"/v1/sessions/{sid}/messages", json=body, headers=headers
            ) as r:
                assert r.status_code == 200
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        started[i].set()
            done = events[-1]
            assert done["type"] == "done"
            if done["finish_reason"] == "error":
                return {"kind": "error", "code": done.get("error_code"), "msg": done["error"]}
            assert done["finish_reason"] == "length"
            return {"kind": "complete", "tokens": done["usage"]["completion_tokens"]}

        async def grpc_chat(i: int, max_tokens: int) -> dict:
            req = cpb.ChatRequest(
                messages=[cpb.Message(role="user", content=f"grpc {i}")], max_tokens=max_tokens
            )
            out = []
            try:
                async for resp in stub.Chat(req, metadata=md):
                    out.append(resp)
                    started[i].set()
            except grpc.aio.AioRpcError as e:
                return {"kind": "error", "code": e.code().name, "msg": e.details()}
            assert out[-1].finish_reason == "length"
            return {"kind": "complete", "tokens": out[-1].usage.completion_tokens}

        plan = [
            openai(0, SHORT), openai(1, SHORT), openai(2, LONG), openai(3, LONG),
            session_turn(4, sids[0], SHORT), session_turn(5, sids[1], LONG),
            session_turn(6, sids[2], LONG),
            grpc_chat(7, SHORT), grpc_chat(8, LONG), grpc_chat(9, LONG),
        ]  # fmt: skip
        short = {0, 1, 4, 7}
        tasks = [asyncio.create_task(p) for p in plan]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=30)
        gateway.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        await asyncio.sleep(0.3)

        # Draining: not ready, new work refused with a clear 503 / UNAVAILABLE; still alive.
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and "draining" in ready.json()["checks"]["gateway"]
        body = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "late"}]}
        late = await c.post("/v1/chat/completions", json=body, headers=headers)
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_restarting"
        assert late.headers["retry-after"]
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            await stub.GetUsage(cpb.UsageRequest(), metadata=md)
            raise AssertionError("a new gRPC call was accepted while draining")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "restarting" in e.details()

        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=GRACE_S + 20)

    for i, res in enumerate(results):
        if i in short:  # finished within the grace period: a whole reply
            assert res == {"kind": "complete", "tokens": SHORT}, (i, res)
        else:  # cut at the end of the grace period, with a final error saying why
            assert res["kind"] == "error", (i, res)
            want = "UNAVAILABLE" if i >= 7 else "server_restarting"  # gRPC: a status
            assert res["code"] == want, (i, res)
            assert "restarting" in json.dumps(res["msg"]), (i, res)
    # The process ends by itself, once the grace period is over (not before, not much after).
    rc = await asyncio.to_thread(gateway.wait, GRACE_S + 20)
    took = time.monotonic() - sigterm_at
    assert rc == 0 and GRACE_S - 0.5 <= took <= GRACE_S + 15, (rc, took)

    # Nothing left running: every stream slot released, every turn lock gone, and each cut
    # session turn stored whole (the user's message with the partial reply).
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    leases = [k for k in r.scan_iter("dsv2:q:*:streams") if r.zcard(k)]
    assert leases == [], leases
    assert list(r.scan_iter("dsv2:sess:*:turn")) == []
    for sid, finished in zip(sids, (True, False, False), strict=True):
        msgs = [json.loads(m) for m in r.lrange(f"dsv2:sess:{sid}:msgs", 0, -1)]
        assert [m["role"] for m in msgs] == ["user", "assistant"], (sid, msgs)
        words = len(msgs[1]["content"].split())
        assert words == SHORT if finished else 0 < words < LONG
    r.close()
