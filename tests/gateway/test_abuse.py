"""Abuse: three clients loop on the largest bodies the caps allow (two anonymous over HTTP,
one free-tier key over gRPC, each a process of its own) while an internal-tier client sends
short requests. Real gateway, real Redis, the real embedded engine with the demo model.

Must hold: the internal client's p95 latency stays within 3x of an idle run; the abusers are
refused by quota (429 / RESOURCE_EXHAUSTED), never a 5xx; the model plane's tokenizer never
reads more than the byte caps allow (here: none of the abusers' bytes at all, since their
byte length alone proves they cannot fit the demo model's context).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.core.tiers import DEFAULT_TIERS
from tests.gateway.conftest import ThreadedGateway, auth, gateway_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "services" / "demo" / "checkpoint"
SAMPLES = 20
ABUSE_S = 10.0


class RecordingTokenizer:
    """The engine's real tokenizer, noting the UTF-8 bytes of every text it encodes (the
    model plane's tokenization cost)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.encoded: list[int] = []

    def encode(self, text: str, *args: Any, **kw: Any) -> list[int]:
        self.encoded.append(len(text.encode("utf-8")))
        return self.inner.encode(text, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def engine_gateway(redis_server) -> Iterator[tuple[ThreadedGateway, RecordingTokenizer]]:
    import torch

    torch.set_num_threads(1)
    from services.gateway.cli.gateway import embedded_backend

    backend = embedded_backend(DEMO, model_id="demo")
    tokenizer = RecordingTokenizer(backend.tokenizer)
    backend.tokenizer = tokenizer
    # The shipped tiers: anonymous callers get `free` (10 requests a minute per cookie and
    # per IP, 100,000 tokens a day).
    gw = ThreadedGateway(gateway_settings(redis_server.url), backend, dict(DEFAULT_TIERS))
    try:
        yield gw, tokenizer
    finally:
        gw.stop()
        backend.engine.close()


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def _internal_latencies(c: httpx.Client) -> list[float]:
    out = []
    for i in range(SAMPLES):
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": f"{i}+{i}="}],
            "max_tokens": 8,
            "temperature": 0,
        }
        t = time.perf_counter()
        r = c.post("/v1/chat/completions", json=body)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return out


def _abuser(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.abuse_client", "--seconds", str(ABUSE_S), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_abusers_cannot_slow_down_an_internal_client(engine_gateway, redis_server):
    gw, tokenizer = engine_gateway
    gw.reset(redis_server)
    limits = gw.settings.limits
    internal = gw.create_key("internal-svc", "internal")
    free = gw.create_key("free-abuser", "free")
    with httpx.Client(base_url=gw.http_url, timeout=60, headers=auth(internal)) as c:
        _internal_latencies(c)  # warm-up: first-call costs out of the idle figure
        idle = _internal_latencies(c)
        abusers = [_abuser(["--http", gw.http_url, "--model", "demo"]) for _ in range(2)]
        abusers.append(_abuser(["--grpc", gw.grpc_target, "--key", free]))
        try:
            time.sleep(3.0)  # they are started and looping
            busy = _internal_latencies(c)
        finally:
            outputs = []
            for p in abusers:
                try:
                    out, err = p.communicate(timeout=ABUSE_S + 30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                outputs.append((p.returncode, out, err))
    for rc, _, err in outputs:
        assert rc == 0, err[-2000:]
    seen = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outputs]
    http_seen = [seen[0], seen[1]]
    grpc_seen = seen[2]

    # Refused by quota: 429 / RESOURCE_EXHAUSTED once the per-IP (anonymous) and per-key
    # limits of 10 a minute are spent; before that, 400 from the byte length. Never a 5xx.
    http_total: dict[str, int] = {}
    for s in http_seen:
        for k, v in s.items():
            http_total[k] = http_total.get(k, 0) + v
    assert set(http_total) <= {"400", "429"}, http_total
    assert http_total.get("429", 0) > 0 and http_total.get("400", 0) <= 10, http_total
    assert set(grpc_seen) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, grpc_seen
    assert grpc_seen.get("RESOURCE_EXHAUSTED", 0) > 0, grpc_seen
    assert grpc_seen.get("INVALID_ARGUMENT", 0) <= 10, grpc_seen

    # The tokenizer read only the internal client's short prompts: nothing near the caps.
    assert tokenizer.encoded and max(tokenizer.encoded) <= limits.max_request_bytes
    assert max(tokenizer.encoded) < 1000, max(tokenizer.encoded)

    p95_idle, p95_busy = _p95(idle), _p95(busy)
    assert p95_busy <= 3 * p95_idle, (p95_idle, p95_busy, http_total, grpc_seen)
