"""Two gateway PROCESSES sharing one Redis (and one scripted model plane over gRPC, a test
double for Ray Serve's ingress): quotas are exact across replicas, and a replica killed
mid-stream gives its stream slot back once the lease expires."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.gateway.conftest import auth, read_sse
from tests.support.redis_fixtures import free_port

TIERS = {
    "tight": {
        "requests_per_minute": 50,
        "requests_per_day": 0,
        "tokens_per_day": 0,
        "concurrent_streams": 0,
        "max_tokens_per_request": 64,
        "session_ttl_days": 1,
    },
    "budget": {
        "requests_per_minute": 0,
        "requests_per_day": 0,
        "tokens_per_day": 600,
        "concurrent_streams": 0,
        "max_tokens_per_request": 64,
        "session_ttl_days": 1,
    },
    "one_stream": {
        "requests_per_minute": 0,
        "requests_per_day": 0,
        "tokens_per_day": 0,
        "concurrent_streams": 1,
        "max_tokens_per_request": 64,
        "session_ttl_days": 1,
    },
}
LEASE_S = 2.0
PROMPT = 3 + 1 + 2  # scripted tokenizer, one one-word user message
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Replica:
    proc: subprocess.Popen
    url: str


@dataclass
class Cluster:
    replicas: list[Replica]
    redis_url: str
    env: dict

    def create_key(self, user: str, tier: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "keys",
                "create",
                "--user",
                user,
                "--tier",
                tier,
            ],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gateway did not come up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory) -> Iterator[Cluster]:
    tiers_file = tmp_path_factory.mktemp("tiers") / "tiers.yaml"
    tiers_file.write_text(yaml.safe_dump({"tiers": TIERS}))
    model = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.scripted_backend", "--delay-s", "0.05",
         "--reply-tokens", "20"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    procs = [model]
    try:
        model_port = int(model.stdout.readline())
        env = {
            **os.environ,
            "DSV2_REDIS_URL": redis_server.url,
            "DSV2_TIERS_FILE": str(tiers_file),
            "DSV2_COOKIE_SECRET": "shared-secret",
            "DSV2_STREAM_LEASE_S": str(LEASE_S),
            "DSV2_MODEL_TARGET": f"127.0.0.1:{model_port}",
        }
        replicas = []
        for _ in range(2):
            port, grpc_port = free_port(), free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "gateway", "--port", str(port),
                 "--grpc-port", str(grpc_port), "--log-level", "warning"],
                cwd=REPO,
                env=env,
            )  # fmt: skip
            procs.append(proc)
            replicas.append(Replica(proc, f"http://127.0.0.1:{port}"))
        for r in replicas:
            _wait_http(r.url, r.proc)
        yield Cluster(replicas, redis_server.url, env)
    finally:
        for p in reversed(procs):
            _stop(p)


@pytest.fixture
def fresh(cluster: Cluster, redis_server) -> Cluster:
    # Keep the cookie secret (configured) — everything else starts clean.
    redis_server.flush()
    return cluster


async def test_exactly_50_of_200_admitted_across_two_processes(fresh: Cluster):
    key = fresh.create_key("burst", "tight")
    body = {
        "model": "dsv2-scripted",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:

        async def one(i: int) -> int:
            url = fresh.replicas[i % 2].url
            r = await c.post(url + "/v1/chat/completions", json=body, headers=auth(key))
            return r.status_code

        codes = await asyncio.gather(*(one(i) for i in range(200)))
    assert codes.count(200) == 50, codes
    assert codes.count(429) == 150


async def test_token_budget_exact_across_processes(fresh: Cluster):
    key = fresh.create_key("tokens", "budget")  # 600/day; each request reserves 6 + 64
    body = {
        "model": "dsv2-scripted",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(timeout=60) as c:

        async def one(i: int) -> int:
            url = fresh.replicas[i % 2].url
            async with c.stream(
                "POST", url + "/v1/chat/completions", json=body, headers=auth(key)
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    assert r.status_code == 429
                    return 0
                events = await read_sse(r)
                usage = next(e["usage"] for e in events if isinstance(e, dict) and e.get("usage"))
                return usage["total_tokens"]

        charged = await asyncio.gather(*(one(i) for i in range(40)))
        await asyncio.sleep(0.2)
        u = (await c.get(fresh.replicas[0].url + "/v1/usage", headers=auth(key))).json()
    admitted = [t for t in charged if t]
    assert admitted and all(t == PROMPT + 20 for t in admitted)
    # Never over budget, and the ledger matches what was generated exactly.
    used = 600 - u["tokens_per_day"]["remaining"]
    assert used == sum(admitted) <= 600


async def test_killed_replica_slot_comes_back(fresh: Cluster):
    key = fresh.create_key("victim", "one_stream")
    body = {
        "model": "dsv2-scripted",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    a, b = fresh.replicas
    async with httpx.AsyncClient(timeout=30) as c:
        async with c.stream(
            "POST", a.url + "/v1/chat/completions", json=body, headers=auth(key)
        ) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            while '"content": "reply' not in await lines.__anext__():
                pass
            a.proc.kill()  # the replica dies mid-stream, never releasing its slot
            a.proc.wait()
        killed_at = time.monotonic()
        r = await c.post(
            b.url + "/v1/chat/completions", json={**body, "stream": False}, headers=auth(key)
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "concurrent_streams"
        # The lease expires: the slot comes back without anyone releasing it.
        while True:
            r = await c.post(
                b.url + "/v1/chat/completions", json={**body, "stream": False}, headers=auth(key)
            )
            if r.status_code == 200:
                break
            assert time.monotonic() - killed_at < LEASE_S + 3, r.text
            await asyncio.sleep(0.2)
    assert time.monotonic() - killed_at >= LEASE_S - 0.5
