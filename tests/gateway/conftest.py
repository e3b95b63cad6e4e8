"""Gateway test harness: the real gateway (HTTP + gRPC, one process) running on its own event
loop in a thread, over the shared real Redis, with the scripted model plane (a test double,
see scripted_backend.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from services.gateway.backends.model_plane import GrpcModelBackend
from services.gateway.core.tiers import DEFAULT_TIERS, Tier
from services.gateway.server import GatewayServer
from services.gateway.settings import Settings
from tests.gateway.scripted_backend import ScriptedBackend, start_inference_server


def tier(name: str, **limits) -> Tier:
    base = dict(
        requests_per_minute=0,
        requests_per_day=0,
        tokens_per_day=0,
        concurrent_streams=0,
        max_tokens_per_request=256,
        session_ttl_days=1,
        # Storage caps and session-creation limits off unless a test sets them.
        max_sessions=0,
        max_messages_per_session=0,
        max_session_bytes=0,
        max_session_image_bytes=0,
        sessions_per_minute=0,
        sessions_per_day=0,
    )
    base.update(limits)
    return Tier(name=name, **base)


# Generous defaults so unrelated tests never trip a limit; each limit test uses its own tier.
TEST_TIERS: dict[str, Tier] = {
    **DEFAULT_TIERS,
    "free": tier("free", requests_per_minute=1000, concurrent_streams=50),
    "roomy": tier("roomy", requests_per_minute=10_000, max_tokens_per_request=1024),
    "tight": tier("tight", requests_per_minute=50),
    "budget": tier("budget", tokens_per_day=600, max_tokens_per_request=64),
    "one_stream": tier("one_stream", concurrent_streams=1, tokens_per_day=10_000),
    # The scripted model plane's model (dsv2-scripted) with its own, tighter budget.
    "per_model": tier(
        "per_model",
        requests_per_minute=1000,
        models={"dsv2-scripted": {"requests_per_minute": 2, "tokens_per_day": 5_000}},
    ),
    # Limits for a model this gateway does not serve: its requests keep the tier's.
    "other_model": tier(
        "other_model", requests_per_minute=3, models={"dsv2-vl": {"requests_per_minute": 1}}
    ),
    "daily5": tier("daily5", requests_per_day=5, max_tokens_per_request=8),
    # Pictures: a token budget to read the charges from, and 3 pictures a day.
    "pictures": tier(
        "pictures", requests_per_minute=1000, tokens_per_day=100_000, images_per_day=3
    ),
    "pictures_many": tier("pictures_many", requests_per_minute=1000, tokens_per_day=100_000),
    # A session keeps at most 2000 bytes of pictures.
    "small_album": tier("small_album", requests_per_minute=1000, max_session_image_bytes=2000),
}


class ThreadedGateway:
    """GatewayServer on its own loop and thread, so tests can use any client (sync or async)
    against real sockets."""

    def __init__(
        self,
        settings: Settings,
        backend: ScriptedBackend,
        tiers: dict[str, Tier] | None = None,
        *,
        over_grpc: bool = False,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.inference_server = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: GatewayServer = self.call(self._make(settings, backend, tiers, over_grpc))
        self.call(self.server.start())

    async def _make(self, settings, backend, tiers, over_grpc: bool) -> GatewayServer:
        if over_grpc:
            # The scripted model plane behind a real grpc.aio Inference server, reached
            # through GrpcModelBackend like Ray Serve's ingress in production.
            self.inference_server, port = await start_inference_server(backend)
            backend = GrpcModelBackend(f"127.0.0.1:{port}", "dsv2")
        return GatewayServer(settings, backend, tiers=tiers)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @staticmethod
    async def _cancel_leftovers() -> None:
        # Library background tasks (e.g. sse-starlette's shutdown watcher) end with the loop.
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def gateway(self):
        return self.server.gateway

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def create_key(self, user: str, tier: str = "free") -> str:
        key, _ = self.call(self.gateway.keys.create(user, tier))
        return key

    def drain(self) -> None:
        self.call(self.gateway.drain())

    def reset(self, redis_server) -> None:
        """Start a test clean: in-flight work finished, Redis flushed, and the refusal memo
        (which mirrors refusals of the Redis just flushed) cleared."""
        self.drain()
        redis_server.flush()
        self.gateway.quotas.memo.clear()

    def stop(self) -> None:
        try:
            self.call(self.server.stop())
            if self.inference_server is not None:
                self.call(self.inference_server.stop(grace=None))
            self.call(self._cancel_leftovers())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def gateway_settings(redis_url: str, **overrides) -> Settings:
    values = dict(
        redis_url=redis_url,
        http_port=0,
        grpc_port=0,
        stream_lease_s=2.0,
        cookie_secret="test-cookie-secret",
        drain_grace_s=1.0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def shared_gateway(redis_server) -> Iterator[ThreadedGateway]:
    backend = ScriptedBackend()
    gw = ThreadedGateway(gateway_settings(redis_server.url), backend, TEST_TIERS)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def routing_gateway(redis_server) -> Iterator[ThreadedGateway]:
    """Like shared_gateway, but POST /v1/chat/completions goes through FastAPI's routing
    (DSV2_HTTP_FAST_LANE=false), for tests that hold the two paths equal. Same Redis: keys
    made on one are valid on the other."""
    gw = ThreadedGateway(
        gateway_settings(redis_server.url, http_fast_lane=False), ScriptedBackend(), TEST_TIERS
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def grpc_backed_gateway(redis_server) -> Iterator[ThreadedGateway]:
    """Like shared_gateway, but the model plane is reached over a real gRPC channel."""
    gw = ThreadedGateway(
        gateway_settings(redis_server.url), ScriptedBackend(), TEST_TIERS, over_grpc=True
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def shared_vision_gateway(redis_server) -> Iterator[ThreadedGateway]:
    """A gateway whose scripted model plane reads pictures (accepts_images, like a
    DeepSeek-VL2 one), fetching image URLs from 127.0.0.1 only (the tests' own HTTP server)."""
    gw = ThreadedGateway(
        gateway_settings(redis_server.url, image_url_hosts="127.0.0.1", image_fetch_timeout_s=2),
        ScriptedBackend(model_id="dsv2-vl-scripted", accepts_images=True),
        TEST_TIERS,
    )
    yield gw
    gw.stop()


@pytest.fixture
def vision_gateway(shared_vision_gateway: ThreadedGateway, redis_server) -> ThreadedGateway:
    shared_vision_gateway.reset(redis_server)
    b = shared_vision_gateway.backend
    b.reply_tokens, b.tokenize_calls, b.delay_s = 8, 0, 0.0
    b.requests.clear()
    b.completed.clear()
    b.cancelled.clear()
    return shared_vision_gateway


@pytest.fixture
def gateway(shared_gateway: ThreadedGateway, redis_server) -> ThreadedGateway:
    """The shared gateway with a clean Redis and the scripted backend's default behaviour."""
    shared_gateway.reset(redis_server)
    b = shared_gateway.backend
    b.reply_tokens, b.delay_s, b.fail_after, b.serving = 8, 0.0, None, True
    b.tokenize_calls, b.max_token_bytes = 0, 0
    b.start_delay_s, b.health_delay_s, b.health_error = 0.0, 0.0, False
    b.tokenized_bytes.clear()
    b.shed_priorities.clear()
    b.requests.clear()
    b.cancelled.clear()
    b.completed.clear()
    b.generated.clear()
    return shared_gateway


@pytest.fixture
async def client(gateway: ThreadedGateway):
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def read_sse(response: httpx.Response) -> list[dict]:
    """Parse `data:` lines of an SSE response into JSON objects ([DONE] kept as a string)."""
    import json

    events = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
