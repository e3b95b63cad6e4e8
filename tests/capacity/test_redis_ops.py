"""Redis operations per turn, counted on a real Redis while the real gateway serves turns.

The capacity plan's Redis load is `turns/s × Redis calls per turn`. That per-turn figure is
counted here, not guessed: a private redis-server's MONITOR stream reports every command it
runs, marking those a Lua script ran ("lua" clients) apart from those a client sent. A call is
one command the gateway sends (EVALSHA of one of its Lua scripts, or a plain read); the
commands are everything Redis executes for the turn, the scripts' inner commands included.

The model plane is the gateway tests' scripted backend (TEST DOUBLE: the engine needs a
checkpoint and Ray; it touches no Redis, so the counts are the gateway's alone).

docs/capacity-example.yaml states the signed-in session turn's figures; this test fails when
the gateway's Redis traffic changes, so the worked example cannot drift from the code.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import redis
import yaml

from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, gateway_settings
from tests.gateway.scripted_backend import ScriptedBackend

EXAMPLE = Path(__file__).parents[2] / "docs" / "capacity-example.yaml"
GATEWAY_DIR = Path(__file__).parents[2] / "services" / "gateway"
TURNS = 5


class CommandMonitor:
    """Counts commands a Redis server runs while `counting` is set, split by who sent them."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.monitor = self.client.monitor()
        self.monitor.__enter__()  # sends MONITOR before the thread starts reading
        self.counts: Counter[tuple[str, str]] = Counter()
        # EVALSHA names a script by the SHA-1 of its source: map it back to the file's name.
        self.scripts = {
            hashlib.sha1(path.read_bytes()).hexdigest(): path.stem
            for path in GATEWAY_DIR.rglob("*.lua")
        }
        self.counting = threading.Event()
        self.seen = 0  # every command read, counted or not
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for entry in self.monitor.listen():
                self.seen += 1
                if self.counting.is_set():
                    source = "lua" if entry.get("client_type") == "lua" else "client"
                    words = entry["command"].split()
                    name = words[0].lower()
                    if name == "evalsha" and len(words) > 1:
                        name = f"evalsha {self.scripts.get(words[1].lower(), words[1])}"
                    # PING is redis-py's idle-connection health check, not work of a turn.
                    if name != "ping":
                        self.counts[(source, name)] += 1
        except (redis.ConnectionError, ValueError, AttributeError, OSError):
            return  # the connection was closed by close()

    async def settle(self) -> None:
        """Wait until no command has arrived for 0.3 s: MONITOR lines come after the replies,
        and a turn's last calls may run after its client has read the end of the stream."""
        last = -1
        while self.seen != last:
            last = self.seen
            await asyncio.sleep(0.3)

    def take(self) -> Counter[tuple[str, str]]:
        counts, self.counts = self.counts, Counter()
        return counts

    def close(self) -> None:
        self.monitor.connection.disconnect()
        self.thread.join(timeout=5)
        self.client.close()


async def _count(
    monitor: CommandMonitor, turn: Callable[[], Awaitable[None]]
) -> tuple[float, float, str]:
    """(calls, commands) per turn, averaged over TURNS turns after one warm-up turn (the first
    turn of a session and of a key does one-off work: session creation, key lookup)."""
    await turn()
    await monitor.settle()
    monitor.take()
    monitor.counting.set()
    for _ in range(TURNS):
        await turn()
    await monitor.settle()
    monitor.counting.clear()
    counts = monitor.take()
    calls = sum(n for (source, _), n in counts.items() if source == "client")
    scripts = sum(n for (source, cmd), n in counts.items() if source == "client" and "eval" in cmd)
    commands = calls - scripts + sum(n for (source, _), n in counts.items() if source == "lua")
    sent = ", ".join(
        f"{cmd} ×{n // TURNS}" if n > TURNS else cmd
        for (source, cmd), n in sorted(counts.items())
        if source == "client"
    )
    return calls / TURNS, commands / TURNS, sent


async def _measure(
    gw: ThreadedGateway, monitor: CommandMonitor
) -> dict[str, tuple[float, float, str]]:
    key = gw.create_key("capacity-user", "pro")
    results: dict[str, tuple[float, float, str]] = {}
    signed_in = httpx.AsyncClient(
        base_url=gw.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    anonymous = httpx.AsyncClient(base_url=gw.http_url, timeout=30)
    async with signed_in, anonymous:
        for name, client in (("signed-in", signed_in), ("anonymous", anonymous)):
            created = await client.post("/v1/sessions", json={})
            assert created.status_code == 201, created.text
            sid = created.json()["id"]

            async def session_turn(client=client, sid=sid) -> None:
                async with client.stream(
                    "POST", f"/v1/sessions/{sid}/messages", json={"content": "hello there"}
                ) as r:
                    body = await r.aread()
                    assert r.status_code == 200 and b'"done"' in body, body

            results[f"{name} session turn"] = await _count(monitor, session_turn)

        async def completion() -> None:
            r = await signed_in.post(
                "/v1/chat/completions",
                json={"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200, r.text

        results["signed-in chat completion"] = await _count(monitor, completion)
    return results


def test_redis_calls_per_turn_match_the_worked_example(own_redis_server) -> None:
    gw = ThreadedGateway(gateway_settings(own_redis_server.url), ScriptedBackend(), TEST_TIERS)
    monitor = CommandMonitor(own_redis_server.url)
    try:
        results = asyncio.run(_measure(gw, monitor))
    finally:
        monitor.close()
        gw.stop()
    print("\nRedis per turn (calls the gateway sends / commands Redis runs, Lua's included):")
    for name, (calls, commands, sent) in results.items():
        print(f"  {name:28} {calls:5g} calls {commands:5g} commands: {sent}")

    for calls, commands, _ in results.values():
        # Whole numbers: every turn of a kind costs the same, nothing ran in the background.
        assert calls.is_integer() and commands.is_integer(), results
        assert 1 <= calls <= commands
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    measured = results["signed-in session turn"][:2]
    assert (example["redis_calls_per_turn"], example["redis_commands_per_turn"]) == measured, (
        f"the gateway's Redis traffic per session turn is now {measured} (calls, commands): "
        f"update redis_*_per_turn in {EXAMPLE.name} and the table in docs/capacity.md"
    )
