"""The pipelined connection the gateway's Lua scripts run on (services/gateway/backends/redis_mux.py),
against a real redis-server: replies reach the right callers, errors are redis-py's, scripts
come back after a restart, a stalled Redis times out and the connection recovers."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.backends.redis_mux import MuxScript, RedisMux
from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS, load_script, make_redis
from services.gateway.settings import Settings

ECHO = "return {ARGV[1], tonumber(ARGV[2]) * 2, KEYS[1]}"


def mux_for(port: int, **kw) -> RedisMux:
    return RedisMux("127.0.0.1", port, **kw)


async def test_concurrent_calls_get_their_own_replies(redis_server):
    mux = mux_for(redis_server.port)
    echo = MuxScript(mux, ECHO)
    replies = await asyncio.gather(*(echo(keys=[f"k{i}"], args=[f"v{i}", i]) for i in range(300)))
    assert replies == [[f"v{i}", 2 * i, f"k{i}"] for i in range(300)]
    # A caller that gives up does not shift the replies of the others.
    gone = asyncio.ensure_future(echo(keys=["x"], args=["cancelled", 1]))
    await asyncio.sleep(0)  # sent, its reply not yet read
    gone.cancel()
    after = asyncio.ensure_future(echo(keys=["y"], args=["kept", 2]))
    assert await after == ["kept", 4, "y"]
    assert gone.cancelled()
    assert await echo(keys=["z"], args=["next", 3]) == ["next", 6, "z"]
    await mux.aclose()


async def test_errors_are_redis_py_errors_and_scripts_come_back(redis_server):
    mux = mux_for(redis_server.port)
    with pytest.raises(ResponseError):
        await MuxScript(mux, "return redis.call('INCR', KEYS[1])")(keys=[], args=[])
    echo = MuxScript(mux, ECHO)
    assert await echo(keys=["a"], args=["b", 1]) == ["b", 2, "a"]
    redis.Redis(port=redis_server.port).script_flush()  # as after a Redis restart
    assert await echo(keys=["a"], args=["c", 2]) == ["c", 4, "a"]
    await mux.aclose()


async def test_outage_fails_fast_then_reconnects(own_redis_server):
    mux = mux_for(own_redis_server.port, timeout_s=1, connect_timeout_s=1)
    echo = MuxScript(mux, ECHO)
    assert await echo(keys=["a"], args=["up", 1]) == ["up", 2, "a"]
    own_redis_server.stop()
    for _ in range(2):
        with pytest.raises(REDIS_DOWN_ERRORS):
            await echo(keys=["a"], args=["down", 1])
    own_redis_server.start()
    assert await echo(keys=["a"], args=["back", 1]) == ["back", 2, "a"]
    await mux.aclose()


async def test_stalled_redis_times_out_and_the_connection_recovers(redis_server):
    mux = mux_for(redis_server.port, timeout_s=0.3)
    echo = MuxScript(mux, ECHO)
    assert await echo(keys=["a"], args=["first", 1]) == ["first", 2, "a"]
    redis.Redis(port=redis_server.port).execute_command("CLIENT", "PAUSE", 800, "ALL")
    with pytest.raises(RedisTimeoutError):
        await echo(keys=["a"], args=["stalled", 1])
    await asyncio.sleep(0.8)
    # A fresh connection: the stalled call's late reply cannot be taken for this one.
    assert await echo(keys=["a"], args=["later", 5]) == ["later", 10, "a"]
    await mux.aclose()


async def test_make_redis_uses_the_mux_with_auth_db_and_falls_back_otherwise(redis_server):
    r = make_redis(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/3"))
    script = load_script(r, "resolve_key")
    assert isinstance(script, MuxScript)
    await r.hset("dsv2:apikey:abc", mapping={"user_id": "u", "tier": "pro", "key_id": "k"})
    assert await script(keys=["dsv2:apikey:abc"], args=["dsv2:"]) == ["u", "pro", "k"]
    assert await script(keys=["dsv2:apikey:none"], args=["dsv2:"]) is None
    await r.aclose()
    unix = make_redis(Settings(redis_url="unix:///tmp/no-such-redis.sock"))
    assert unix.mux is None and not isinstance(load_script(unix, "resolve_key"), MuxScript)
    await unix.aclose()
    with pytest.raises(RedisConnectionError):
        await MuxScript(mux_for(1, connect_timeout_s=0.5), ECHO)(keys=["a"], args=["x", 1])
