"""Budget alerts against a real Redis and a real HTTP receiver on 127.0.0.1: sent at 80% and
100% of a daily budget, once per user and day across replicas, delivered in the background
(a slow or failing webhook never delays a request), retried a bounded number of times; a
webhook URL that is not http(s) is refused at start, naming the setting."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import ValidationError

from services.cli import main
from services.gateway.backends.redis_store import Keyspace, make_redis
from services.gateway.core.budget_alerts import BudgetAlerts
from services.gateway.core.errors import RateLimited
from services.gateway.core.quotas import Quotas, Subject
from services.gateway.core.usage import utc_day
from services.gateway.settings import Settings
from tests.gateway.conftest import ThreadedGateway, auth, tier

BODY = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Receiver:
    """A webhook receiver: records every POST (JSON body); answers with the queued statuses
    (then 200), after `delay_s`."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.attempts = 0
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.attempts += 1
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    delay = receiver.delay_s
                time.sleep(delay)
                if status == 200:
                    with receiver.lock:
                        receiver.posts.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _alerts(redis, url: str, **kw) -> BudgetAlerts:
    return BudgetAlerts(redis, Keyspace("dsv2:"), url, **{"backoff_s": 0.05, **kw})


@pytest.fixture
def alerting_gateway(gateway: ThreadedGateway, receiver: Receiver, monkeypatch):
    """The shared gateway with alerts to `receiver` (as DSV2_BUDGET_WEBHOOK_URL would set)."""
    alerts = _alerts(gateway.gateway.redis, receiver.url, timeout_s=0.5, attempts=2)
    monkeypatch.setattr(gateway.gateway.quotas, "alerts", alerts)
    yield gateway, alerts
    gateway.call(alerts.aclose())


async def test_requests_per_day_alerts_at_80_and_100_once(alerting_gateway, receiver: Receiver):
    gateway, alerts = alerting_gateway
    key = gateway.create_key("gina", "daily5")  # 5 requests per day
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        codes = [
            (await c.post("/v1/chat/completions", json=BODY, headers=auth(key))).status_code
            for _ in range(7)
        ]
    assert codes == [200] * 5 + [429] * 2
    gateway.call(alerts.drain())
    assert receiver.posts == [
        {
            "user": "gina",
            "tier": "daily5",
            "model": None,
            "metric": "requests_per_day",
            "threshold": 80,
            "used": 4,
            "limit": 5,
            "day": utc_day(),
        },
        {
            "user": "gina",
            "tier": "daily5",
            "model": None,
            "metric": "requests_per_day",
            "threshold": 100,
            "used": 5,
            "limit": 5,
            "day": utc_day(),
        },
    ]


@pytest.fixture
async def redis_pair(redis_url: str):
    """Two clients, as two gateway replicas would have."""
    a, b = make_redis(Settings(redis_url=redis_url)), make_redis(Settings(redis_url=redis_url))
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_token_budget_alerts_and_refusal_means_spent(redis_pair, receiver: Receiver):
    redis, _ = redis_pair
    alerts = _alerts(redis, receiver.url)
    quotas = Quotas(redis, Keyspace("dsv2:"), alerts=alerts)
    user = Subject("u:hank", tier("pro", tokens_per_day=100))
    await quotas.finish(await quotas.admit([user], 50, usage_user="hank"), 30, 10)  # 40%
    await asyncio.sleep(0.1)
    assert receiver.attempts == 0
    await quotas.finish(await quotas.admit([user], 50, usage_user="hank"), 30, 15)  # 85%
    with pytest.raises(RateLimited):  # 85 + 20 > 100: the budget is spent for this request
        await quotas.admit([user], 20, usage_user="hank")
    await alerts.drain()
    # deliveries run in the background, each on its own: their order is not guaranteed
    got = sorted((p["metric"], p["threshold"], p["used"], p["limit"]) for p in receiver.posts)
    assert got == [("tokens_per_day", 80, 85, 100), ("tokens_per_day", 100, 85, 100)]
    await alerts.aclose()


async def test_model_budget_alert_names_the_model(redis_pair, receiver: Receiver):
    redis, _ = redis_pair
    alerts = _alerts(redis, receiver.url)
    quotas = Quotas(redis, Keyspace("dsv2:"), alerts=alerts)
    vl = tier("free", tokens_per_day=10_000, models={"dsv2-vl": {"tokens_per_day": 100}})
    lease = await quotas.admit([Subject("u:ivy", vl)], 90, model="dsv2-vl", usage_user="ivy")
    await quotas.finish(lease, 80, 10)
    await alerts.drain()
    (post,) = receiver.posts
    assert (post["model"], post["metric"], post["threshold"]) == ("dsv2-vl", "tokens_per_day", 80)
    assert post["limit"] == 100
    await alerts.aclose()


async def test_sent_once_across_replicas(redis_pair, receiver: Receiver):
    subject = Subject("u:jack", tier("free", tokens_per_day=100))
    replicas = [_alerts(r, receiver.url) for r in redis_pair]
    for _ in range(3):  # every replica sees the crossing, several times
        for a in replicas:
            a.tokens_used("jack", subject, 90)
    await asyncio.gather(*(a.drain() for a in replicas))
    assert [p["threshold"] for p in receiver.posts] == [80]
    for a in replicas:
        a.tokens_used("jack", subject, 100)
    await asyncio.gather(*(a.drain() for a in replicas))
    assert sorted(p["threshold"] for p in receiver.posts) == [80, 100]  # delivery order varies
    for a in replicas:
        await a.aclose()


async def test_failed_attempt_is_retried(redis_pair, receiver: Receiver):
    receiver.statuses = [500]
    alerts = _alerts(redis_pair[0], receiver.url, attempts=3)
    alerts.tokens_used("kim", Subject("u:kim", tier("free", tokens_per_day=10)), 8)
    await alerts.drain()
    assert receiver.attempts == 2 and len(receiver.posts) == 1
    await alerts.aclose()


async def test_slow_webhook_never_delays_requests(alerting_gateway, receiver: Receiver):
    gateway, alerts = alerting_gateway  # webhook timeout 0.5 s, 2 attempts
    receiver.delay_s = 3.0
    key = gateway.create_key("lena", "daily5")
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        started = time.monotonic()
        for _ in range(5):  # crosses 80% and 100%: two deliveries start, both hang
            r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
            assert r.status_code == 200
        elapsed = time.monotonic() - started
    # One hanging delivery alone would take 3 s (the receiver) or 0.5 s per attempt.
    assert elapsed < 2.0, elapsed
    gateway.call(alerts.drain(timeout_s=10))
    assert receiver.posts == []  # every attempt timed out...
    # ...so the claims were given back: the next time the user is seen, they are sent.
    receiver.delay_s = 0.0
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 429  # refused: requests_per_day is spent → the 100% alert
    gateway.call(alerts.drain(timeout_s=10))
    assert sorted(p["threshold"] for p in receiver.posts) == [80, 100]  # delivery order varies


def test_webhook_url_must_be_http(monkeypatch, capsys):
    for bad in ("ftp://hooks.example/x", "hooks.example/x", "http://"):
        with pytest.raises(ValidationError, match="DSV2_BUDGET_WEBHOOK_URL"):
            Settings(budget_webhook_url=bad)
    assert Settings(budget_webhook_url="https://hooks.example/x").budget_webhook_url
    monkeypatch.setenv("DSV2_BUDGET_WEBHOOK_URL", "file:///etc/passwd")
    assert main(["gateway"]) == 2  # refused at start, before anything listens
    assert "DSV2_BUDGET_WEBHOOK_URL must be an http:// or https:// URL" in capsys.readouterr().err
