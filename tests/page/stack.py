"""The running stack of the page tests: the real gateway app under uvicorn on 127.0.0.1 with
its own key prefix in the shared Redis and its own tiers, and a model plane (the scripted
double by default), plus the page actions the tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml
from playwright.sync_api import Page, expect

from services.gateway.backends.redis_store import Keyspace
from services.gateway.core.keys import KeyStore
from services.gateway.http.app import create_app
from services.gateway.settings import Settings
from tests.page.backend_double import ScriptedBackend
from tests.page.server import serve

ROOMY = dict(
    requests_per_minute=1000,
    requests_per_day=10_000,
    tokens_per_day=1_000_000,
    concurrent_streams=20,
    max_tokens_per_request=256,
    session_ttl_days=1,
    # The tests open many chats a minute from one address.
    max_sessions=1000,
    sessions_per_minute=1000,
    sessions_per_day=10_000,
)


@dataclass
class RunningGateway:
    url: str
    backend: Any  # ScriptedBackend unless the test passed its own model plane
    redis_url: str
    prefix: str

    def create_key(self, user_id: str, tier: str) -> str:
        async def create() -> str:
            client = aioredis.from_url(self.redis_url)
            try:
                key, _ = await KeyStore(client, Keyspace(self.prefix)).create(user_id, tier)
                return key
            finally:
                await client.aclose()

        # Playwright's sync API owns this thread's event loop: run the client in another.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, create()).result(timeout=30)


@contextmanager
def running_gateway(
    redis_url: str,
    folder: Path,
    name: str,
    tiers: dict,
    backend: Any = None,
    **settings: Any,
) -> Iterator[RunningGateway]:
    """The gateway app with its own key prefix in the shared Redis and its own tiers, over
    `backend` (default: a new ScriptedBackend); `settings` override gateway Settings."""
    tiers_file = folder / f"{name}-tiers.yaml"
    tiers_file.write_text(yaml.safe_dump(tiers))
    prefix = f"dsv2-page-{name}:"
    config = Settings(
        redis_url=redis_url,
        redis_key_prefix=prefix,
        tiers_file=tiers_file,
        cookie_secret="page-test-cookie-secret",
        stream_lease_s=5.0,
        **settings,
    )
    backend = ScriptedBackend() if backend is None else backend
    with serve(create_app(config, backend)) as url:
        yield RunningGateway(url, backend, redis_url, prefix)


def open_page(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def last_reply(page: Page):
    return page.locator(".message.assistant").last


def wait_done(page: Page) -> None:
    expect(last_reply(page)).to_have_attribute("data-state", "done")
    expect(page.locator("#send")).to_be_visible()


def assert_no_page_errors(page: Page) -> None:
    problems = page.problems  # type: ignore[attr-defined]
    assert problems.errors == []
    assert problems.dialogs == []
