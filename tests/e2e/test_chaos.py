"""Chaos under traffic: 30 concurrent multi-turn chats through 2 gateway PROCESSES into the
model plane on a real local Ray Serve (2 Engine replicas, 2 expert shards over gRPC, the
shipped demo model), with a real Redis (append-only file on, as the Helm chart runs it). While
the chats run, the test kills expert shard 1, then gateway process 0, then one Engine replica,
then restarts Redis. Nothing here is a test double.

Clients behave as a well-written client does: each turn carries an `Idempotency-Key`; after
an error (HTTP 503/409, a `done` event carrying an error, a dropped connection) it retries the
same turn with the same key, on the other gateway when its own is gone.

What must hold, and is printed:
- every attempt in flight at a fault ends (whole reply, or a clear error: an OpenAI-shaped
  error body, or a `done` event naming the error) within 10 s of that fault; only attempts on
  the killed gateway may end with a dropped connection;
- every chat ends with all its turns answered; its stored history is exactly its turns in
  order, each user message once (retries never duplicate it), each reply the one the client
  got (no message lost);
- tokens admitted (reserved) - tokens refunded = the day's token counter in Redis = the tokens
  the clients were told they used (turns cut by the gateway's death are refunded whole when
  their lease expires);
- the service recovers without a restart: new chats succeed on the surviving gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import ray
import redis
import yaml
from ray import serve

from services.demo.evaluate import DEFAULT_CHECKPOINT
from services.serving.app import build_app
from services.serving.local import LocalServe, free_port
from tests.support.redis_fixtures import RedisServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
APP = "chaos"
CHATS = 30
TURNS = 4
FAULT_GAP_S = 3.0
MIN_IN_FLIGHT = 5  # each fault must meet traffic
MAX_TOKENS = 40
FAULT_BOUND_S = 10.0  # every in-flight attempt ends within this of a fault
LEASE_S = 4.0  # stream leases and turn locks of a dead gateway expire after this
USER = "chaos-user"
TIER = {
    "requests_per_minute": 0,
    "requests_per_day": 0,
    "tokens_per_day": 10_000_000,  # limited, so the day's counter is kept and can be checked
    "concurrent_streams": 0,
    "max_tokens_per_request": MAX_TOKENS,
    "session_ttl_days": 1,
    "max_sessions": 0,
    "max_messages_per_session": 0,
    "max_session_bytes": 0,
    "sessions_per_minute": 0,
    "sessions_per_day": 0,
}
# 2 Engine replicas and 2 shards fit here (the demo model is 6 MB); each gets a small logical
# CPU share and one torch thread, as the 2 cores are shared by every process.
SMALL = {"num_cpus": 0.25, "max_ongoing_requests": 64, "torch_threads": 1}


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen
    url: str


@dataclass
class Stack:
    redis: RedisServer
    gateways: list[Gateway]
    key: str


def _replica_actor(deployment: str):
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and f"{APP}#{deployment}#" in entry["name"]:
            return ray.get_actor(entry["name"], namespace="serve")
    raise AssertionError(f"no replica of {APP}/{deployment}")


def _wait_healthy(gw: Gateway, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with {gw.proc.returncode}")
        try:
            if httpx.get(gw.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("gateway did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(ray_serve: LocalServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("chaos")
    tiers_file = state / "tiers.yaml"
    tiers_file.write_text(yaml.safe_dump({"tiers": {"chaos": TIER}}))
    # Persistence as in production (the chart's Redis runs AOF): a restart keeps the data.
    store = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    store.start()
    procs: list[subprocess.Popen] = []
    serve.run(
        build_app(
            {
                "model_path": str(DEFAULT_CHECKPOINT),
                "model_id": "demo",
                "num_expert_shards": 2,
                "engine_replicas": 2,
                "engine": {"max_num_seqs": 32},
                "engine_deployment": SMALL,
                "shard_deployment": SMALL,
            }
        ),
        name=APP,
        route_prefix=f"/{APP}",
    )
    try:
        env = {
            **os.environ,
            "DSV2_REDIS_URL": store.url,
            "DSV2_TIERS_FILE": str(tiers_file),
            "DSV2_COOKIE_SECRET": "chaos-secret",
            "DSV2_STREAM_LEASE_S": str(LEASE_S),
            "DSV2_MODEL_TARGET": ray_serve.grpc_target,
            "DSV2_MODEL_APP": APP,
            "DSV2_MODEL_START_TIMEOUT_S": "8",
        }
        key = subprocess.run(
            [sys.executable, "-m", "services.cli", "keys", "create", "--user", USER,
             "--tier", "chaos"],
            env=env, cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        gateways = []
        for _ in range(2):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "gateway", "--port", str(port),
                 "--grpc-port", str(free_port()), "--log-level", "warning"],
                cwd=REPO, env=env,
            )  # fmt: skip
            procs.append(proc)
            gateways.append(Gateway(proc, f"http://127.0.0.1:{port}"))
        for gw in gateways:
            _wait_healthy(gw)
        yield Stack(store, gateways, key)
    finally:
        for p in procs:
            _stop(p)
        serve.delete(APP)
        store.close()


# --- the clients ----------------------------------------------------------------------------


@dataclass
class Attempt:
    chat: int
    turn: int
    gateway: int
    started: float
    ended: float = 0.0
    outcome: str = ""  # reply | replayed | http_<status> | done_error | dropped
    detail: str = ""


@dataclass
class Turn:
    content: str
    key: str
    reply: str = ""
    message_id: str | None = None


@dataclass
class Ledger:
    attempts: list[Attempt] = field(default_factory=list)
    charged_tokens: int = 0  # usage the clients were told, over every `done` event
    unclear: list[str] = field(default_factory=list)
    turns_done: int = 0
    under_way: asyncio.Event = field(default_factory=asyncio.Event)  # half the chats answered

    def turn_done(self) -> None:
        self.turns_done += 1
        if self.turns_done >= CHATS // 2:
            self.under_way.set()


def _question(chat: int, turn: int) -> str:
    return f"What is {10 + chat} + {20 + 7 * turn}?"


async def _one_attempt(
    client: httpx.AsyncClient, stack: Stack, sid: str, turn: Turn, a: Attempt, ledger: Ledger
) -> bool:
    """One try of a turn; True when it got the whole reply."""
    url = f"{stack.gateways[a.gateway].url}/v1/sessions/{sid}/messages"
    headers = {"Authorization": f"Bearer {stack.key}", "Idempotency-Key": turn.key}
    body = {"content": turn.content, "max_tokens": MAX_TOKENS, "temperature": 0}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                raw = await r.aread()
                a.outcome = f"http_{r.status_code}"
                try:
                    a.detail = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    ledger.unclear.append(f"{a.outcome}: {raw[:200]!r}")
                return False
            text, done = [], None
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                ev = json.loads(line[5:])
                if ev["type"] == "delta":
                    text.append(ev["text"])
                elif ev["type"] == "done":
                    done = ev
            if done is None:
                a.outcome = "dropped"  # the stream ended without its `done` event
                return False
            if not done.get("replayed"):
                ledger.charged_tokens += done["usage"]["total_tokens"]
            if done.get("error") or done["finish_reason"] not in ("stop", "length"):
                a.outcome, a.detail = "done_error", done.get("error", done["finish_reason"])
                if not a.detail:
                    ledger.unclear.append(f"done without error text: {done}")
                return False
            a.outcome = "replayed" if done.get("replayed") else "reply"
            turn.reply, turn.message_id = "".join(text), done["message_id"]
            return True
    except (httpx.TransportError, httpx.RemoteProtocolError) as e:
        a.outcome, a.detail = "dropped", type(e).__name__
        return False
    finally:
        a.ended = time.monotonic()


async def _chat(
    i: int, client: httpx.AsyncClient, stack: Stack, ledger: Ledger, deadline: float
) -> tuple[str, list[Turn]]:
    gw = i % 2
    headers = {"Authorization": f"Bearer {stack.key}"}
    while True:  # creating the session is retried the same way (it is not a turn)
        try:
            r = await client.post(stack.gateways[gw].url + "/v1/sessions", json={}, headers=headers)
            if r.status_code == 201:
                sid = r.json()["id"]
                break
        except httpx.TransportError:
            gw = 1 - gw
        assert time.monotonic() < deadline, f"chat {i} could not create its session"
        await asyncio.sleep(0.3)
    turns = []
    for t in range(TURNS):
        turn = Turn(_question(i, t), key=str(uuid.uuid4()))
        turns.append(turn)
        while True:
            a = Attempt(i, t, gw, time.monotonic())
            ledger.attempts.append(a)
            if await _one_attempt(client, stack, sid, turn, a, ledger):
                ledger.turn_done()
                break
            if a.outcome == "dropped" and stack.gateways[gw].proc.poll() is not None:
                gw = 1 - gw  # its gateway is gone: fail over
            assert time.monotonic() < deadline, f"chat {i} turn {t} never completed: {a}"
            await asyncio.sleep(0.3)
    return sid, turns


# --- the faults -----------------------------------------------------------------------------


async def _faults(stack: Stack, ledger: Ledger, log: list[tuple[str, float]]) -> None:
    """Kill a shard, a gateway, an Engine replica, restart Redis, a few seconds apart, once
    the chats are under way."""
    await ledger.under_way.wait()

    ray.kill(_replica_actor("ExpertShard1"), no_restart=True)
    log.append(("expert shard 1 killed", time.monotonic()))
    await asyncio.sleep(FAULT_GAP_S)

    stack.gateways[0].proc.kill()
    log.append(("gateway 0 killed", time.monotonic()))
    await asyncio.sleep(FAULT_GAP_S)

    ray.kill(_replica_actor("Engine"), no_restart=True)
    log.append(("engine replica killed", time.monotonic()))
    await asyncio.sleep(FAULT_GAP_S)

    await asyncio.to_thread(stack.redis.restart)
    log.append(("redis restarted", time.monotonic()))


def _plane_whole_again(timeout_s: float = 90) -> float:
    """Seconds until Serve has replaced the killed replicas by itself (2 Engine replicas and
    both shards running), nobody restarting anything."""
    started = time.monotonic()
    want = {"Engine": 2, "ExpertShard0": 1, "ExpertShard1": 1}
    while True:
        deployments = serve.status().applications[APP].deployments
        running = {
            name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in deployments.items()
        }
        if all(running.get(name) == n for name, n in want.items()):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"the model plane stayed at {running}"
        time.sleep(0.5)


def _stored_messages(stack: Stack, sid: str) -> list[dict]:
    r = httpx.get(
        f"{stack.gateways[1].url}/v1/sessions/{sid}",
        headers={"Authorization": f"Bearer {stack.key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def _day_ledger(stack: Stack) -> tuple[int, int, int]:
    """(the user's token counter of the day, tokens admitted (reserved), tokens refunded)."""
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        day = int(time.time() // 86400)
        (counter,) = client.scan_iter(f"*u:{USER}*tok:{day}")
        (reservations,) = client.scan_iter(f"*u:{USER}*res:{day}")
        admitted, refunded = client.hmget(reservations, "admitted", "refunded")
        return int(client.get(counter)), int(admitted), int(refunded or 0)
    finally:
        client.close()


async def test_chats_survive_faults_under_traffic(stack: Stack) -> None:
    ledger, faults = Ledger(), []
    started = time.monotonic()
    deadline = started + 150
    limits = httpx.Limits(max_connections=100)
    timeout = httpx.Timeout(60, connect=5)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        chaos = asyncio.create_task(_faults(stack, ledger, faults))
        chats = await asyncio.gather(
            *(_chat(i, client, stack, ledger, deadline) for i in range(CHATS))
        )
        await chaos  # the chats outlast the faults (asserted below)

        # Recovery without a restart: Serve replaces the killed replicas, and new chats
        # succeed on the surviving gateway.
        whole_after = await asyncio.to_thread(_plane_whole_again)
        recovery = Ledger()
        fresh = await asyncio.gather(
            *(_chat(1 + 2 * i, client, stack, recovery, time.monotonic() + 60) for i in range(2))
        )
        elapsed = time.monotonic() - started

        # Leases of turns the dead gateway never finished expire; the next quota call for the
        # user (here a usage check) refunds their reservations.
        await asyncio.sleep(LEASE_S + 0.5)
        r = await client.get(
            stack.gateways[1].url + "/v1/usage", headers={"Authorization": f"Bearer {stack.key}"}
        )
        assert r.status_code == 200, r.text
    counted, admitted, refunded = _day_ledger(stack)
    retried = sum(1 for a in ledger.attempts if a.outcome not in ("reply", "replayed"))

    outcomes = Counter(a.outcome for a in ledger.attempts)
    print(f"\nchaos: {CHATS} chats x {TURNS} turns in {elapsed:.1f} s; 2 gateways, 2 Engine "
          f"replicas, 2 expert shards")  # fmt: skip
    for name, at in faults:
        in_flight = [a for a in ledger.attempts if a.started <= at < a.ended]
        worst = max((a.ended - at for a in in_flight), default=0.0)
        print(f"  {name} at +{at - started:.1f} s: {len(in_flight)} attempts in flight, "
              f"all ended within {worst:.1f} s")  # fmt: skip
    print(f"  attempts {len(ledger.attempts)}: {dict(outcomes)}")
    print(f"  attempts that failed and were retried: {retried}")
    print(f"  model plane whole again (Serve replaced the killed replicas) {whole_after:.1f} s "
          "after the chats ended; 2 new chats on the surviving gateway answered")  # fmt: skip
    told = ledger.charged_tokens + recovery.charged_tokens
    print(f"  tokens: admitted {admitted} - refunded {refunded} = {admitted - refunded}; the "
          f"day's counter {counted}; the clients were told {told}")  # fmt: skip

    assert len(faults) == 4, "the chats ended before every fault was injected"
    assert not ledger.unclear, ledger.unclear[:5]
    for name, at in faults:
        in_flight = sum(1 for a in ledger.attempts if a.started <= at < a.ended)
        assert in_flight >= MIN_IN_FLIGHT, f"{name}: only {in_flight} attempts in flight"
        for a in ledger.attempts:
            if a.started <= at < a.ended:
                assert a.ended - at <= FAULT_BOUND_S, f"{name}: {a} ended too late"
    # Only the killed gateway's clients may see a dropped connection.
    dropped = [a for a in ledger.attempts if a.outcome == "dropped"]
    assert all(a.gateway == 0 for a in dropped), dropped

    lost, duplicated = 0, 0
    for sid, turns in [*chats, *fresh]:
        stored = _stored_messages(stack, sid)
        users = [m["content"] for m in stored if m["role"] == "user"]
        duplicated += len(users) - len(set(users))
        expected = [x for t in turns for x in (("user", t.content), ("assistant", t.reply))]
        got = [(m["role"], m["content"]) for m in stored]
        lost += sum(1 for e in expected if e not in got)
        assert got == expected, f"session {sid}: stored {got}, expected {expected}"
        assert [m["id"] for m in stored if m["role"] == "assistant"] == [
            t.message_id for t in turns
        ]
    print(f"  messages: {2 * TURNS * (CHATS + 2)} expected, {lost} lost, {duplicated} duplicated")
    assert admitted - refunded == counted == told
