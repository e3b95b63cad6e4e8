"""Redis connection pool and Lua script loading shared by keys, quotas and sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.backends.redis_mux import MuxScript, RedisMux
from services.gateway.settings import Settings

# Errors meaning "Redis cannot take this right now" (mapped to 503; the pool reconnects by
# itself). ReadOnlyError: a replica that has not been promoted yet during a failover;
# OutOfMemoryError: a `noeviction` server at maxmemory (session writes map it to their own
# 503 first, see sessions.py; this keeps any other write from becoming a 500).
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OutOfMemoryError,
)

T = TypeVar("T")

_LUA_DIR = Path(__file__).parent / "lua"


class GatewayRedis(aioredis.Redis):
    """redis-py's client plus `mux`: the pipelined connection the hot Lua scripts run on
    (redis_mux.py), or None where the URL is not plain TCP (then scripts use redis-py)."""

    mux: RedisMux | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self.mux is not None:
            await self.mux.aclose()
        await super().aclose(close_connection_pool)


def make_redis(settings: Settings, url: str | None = None) -> GatewayRedis:
    """A client (of `url`, default settings.redis_url) over a BlockingConnectionPool: waits
    for a free connection instead of failing under bursts, and reconnects on the next command
    after an outage. One quick retry only, so an outage turns into a prompt 503 rather than a
    hang."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url or settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
        health_check_interval=15,
    )
    client = GatewayRedis(connection_pool=pool)
    kw = pool.connection_kwargs
    if pool.connection_class is aioredis.Connection and "host" in kw:
        client.mux = RedisMux(
            kw["host"],
            int(kw.get("port") or 6379),
            db=int(kw.get("db") or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            timeout_s=settings.redis_socket_timeout_s,
            connect_timeout_s=settings.redis_socket_timeout_s,
        )
    return client


def load_script(client: aioredis.Redis, name: str) -> AsyncScript | MuxScript:
    """`lua/<name>.lua`, run by EVALSHA (re-sent with EVAL after a Redis restart): over the
    client's pipelined connection when it has one, else through redis-py."""
    source = (_LUA_DIR / f"{name}.lua").read_text()
    mux = getattr(client, "mux", None)
    if mux is not None:
        return MuxScript(mux, source)
    return client.register_script(source)


class Keyspace:
    """Key names, all under one prefix so several deployments can share a Redis.

    Two groups, which may live in two Redis servers (Settings.sessions_redis_url): API keys,
    users, the cookie secret and quota counters (must never be evicted), and the `sess:*` and
    `user:<id>:sessions` keys of chat sessions (evictable; every one has a TTL)."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def api_key(self, digest: str) -> str:
        return f"{self.p}apikey:{digest}"

    def key_meta(self, key_id: str) -> str:
        return f"{self.p}keymeta:{key_id}"

    def key_index(self) -> str:
        return f"{self.p}keys"

    def user(self, user_id: str) -> str:
        return f"{self.p}user:{user_id}"

    def user_keys(self, user_id: str) -> str:
        return f"{self.p}user:{user_id}:keys"

    def cookie_secret(self) -> str:
        return f"{self.p}cookie_secret"

    def quota(self, subject: str, what: str) -> str:
        return f"{self.p}q:{subject}:{what}"

    def session(self, session_id: str) -> str:
        return f"{self.p}sess:{session_id}"

    def session_messages(self, session_id: str) -> str:
        return f"{self.p}sess:{session_id}:msgs"

    def session_turn(self, session_id: str) -> str:
        return f"{self.p}sess:{session_id}:turn"

    def session_images(self, session_id: str) -> str:
        """Hash: picture id (StoredImage.id) -> the file's bytes in base64."""
        return f"{self.p}sess:{session_id}:imgs"

    def user_sessions(self, user_id: str) -> str:
        return f"{self.p}user:{user_id}:sessions"

    def usage(self, day: str, user_id: str) -> str:
        return f"{self.p}usage:{day}:{user_id}"

    def usage_users(self, day: str) -> str:
        return f"{self.p}usage-users:{day}"

    def budget_alert(self, day: str, user_id: str, metric: str, threshold: int) -> str:
        return f"{self.p}alert:{day}:{user_id}:{metric}:{threshold}"


# How long bookkeeping that must not be lost (a finished turn's) keeps trying while Redis
# is unreachable.
BOOKKEEPING_RETRY_S = 8.0
# Worth waiting out: Redis restarting or failing over. (Not a full Redis: that lasts.)
REDIS_AWAY_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)


async def retry_while_away(
    call: Callable[[], Awaitable[T]], within_s: float = BOOKKEEPING_RETRY_S
) -> T:
    """call(), tried again with a growing pause while Redis is unreachable, for at most
    within_s; then its error propagates."""
    deadline = time.monotonic() + within_s
    pause = 0.1
    while True:
        try:
            return await call()
        except REDIS_AWAY_ERRORS:
            if time.monotonic() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)
