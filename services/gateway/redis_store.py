"""Redis connection pool and Lua script loading shared by keys, quotas and sessions."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.settings import Settings

# Errors meaning "Redis cannot take this right now" (mapped to 503; the pool reconnects by
# itself). ReadOnlyError: a replica that has not been promoted yet during a failover.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
)

_LUA_DIR = Path(__file__).parent / "lua"


def make_redis(settings: Settings) -> aioredis.Redis:
    """A client over a BlockingConnectionPool: waits for a free connection instead of failing
    under bursts, and reconnects on the next command after an outage. One quick retry only, so
    an outage turns into a prompt 503 rather than a hang."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
        health_check_interval=15,
    )
    return aioredis.Redis(connection_pool=pool)


def load_script(client: aioredis.Redis, name: str) -> AsyncScript:
    """Register `lua/<name>.lua`; redis-py runs it by EVALSHA and reloads it after a restart."""
    return client.register_script((_LUA_DIR / f"{name}.lua").read_text())


class Keyspace:
    """Key names, all under one prefix so several deployments can share a Redis."""

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

    def user_sessions(self, user_id: str) -> str:
        return f"{self.p}user:{user_id}:sessions"
