"""The gateway's Lua scripts over one pipelined Redis connection per process.

Every chat request runs two or three short Lua scripts (key lookup, quota admit, quota
finish). Through redis-py's asyncio client each call costs ~100-150 us of CPU (pool checkout
with locks, retry and timeout wrappers, observability hooks, packing in Python), more than
all the rest of the request's Redis work. Here a call is: pack the command with hiredis,
append it to a buffer flushed once per event-loop iteration, and await a future that the
connection's reader resolves in order (Redis answers a connection's commands in the order
sent). Many requests' scripts share one socket write and one read.

The scripts themselves are unchanged, so atomicity and exact quotas are too: each still runs
as one EVALSHA. Semantics kept from redis-py: errors are redis.exceptions (ConnectionError,
TimeoutError, ReadOnlyError, NoScriptError ... via its own error table), so callers map an
outage to 503 as before; a script missing after a Redis restart is re-sent with EVAL; the
connection is re-established on the next call after an outage; a reply not received within
the socket timeout fails that call and resets the connection (late replies would otherwise be
matched to later commands).

Only plain TCP URLs (redis://, with optional user, password and db) use this path; for TLS or
Unix sockets `load_script` falls back to redis-py's scripts.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Protocol(asyncio.Protocol):
    """One connection: commands are buffered and written once per loop iteration; replies
    are matched to the waiting futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(encoding="utf-8")
        self.transport: asyncio.Transport | None = None
        # (future, deadline) per command sent and not yet answered, oldest first.
        self.pending: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, args: tuple) -> asyncio.Future:
        fut = self.loop.create_future()
        if self.closed:
            fut.set_exception(RedisConnectionError("Connection to Redis lost"))
            return fut
        deadline = self.loop.time() + self.timeout_s
        self.pending.append((fut, deadline))
        self.out.append(hiredis.pack_command(args))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._check_timeout)
        return fut

    def _flush(self) -> None:
        self.flush_scheduled = False
        out, self.out = self.out, []
        if not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))

    def _check_timeout(self) -> None:
        self.timer = None
        if self.closed or not self.pending:
            return
        _, deadline = self.pending[0]
        if deadline <= self.loop.time():
            self.abort(RedisTimeoutError("Timeout reading from Redis"))
            return
        self.timer = self.loop.call_at(deadline, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as e:
                self.abort(RedisConnectionError(f"Redis protocol error: {e}"))
                return
            if reply is False:
                return
            if not pending:  # nothing asked: the stream is out of step
                self.abort(RedisConnectionError("unexpected reply from Redis"))
                return
            fut, _ = pending.popleft()
            if fut.done():  # the caller gave up (cancelled); its reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(BaseParser.parse_error(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(RedisConnectionError(f"Connection to Redis lost: {exc or 'closed'}"))

    def abort(self, exc: Exception) -> None:
        """Give up on this connection: fail every waiting call with `exc`."""
        self._fail_all(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, exc: Exception) -> None:
        self.closed = True
        self.out.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


class RedisMux:
    """Pipelined command execution over one connection (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future | None = None

    async def _connection(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        proto = self._proto
        if proto is not None and not proto.closed and self._loop is loop:
            return proto
        if self._loop is not loop:  # first use, or a new event loop (tests): start afresh
            self._drop()
            self._loop = loop
        if self._connecting is None:
            self._connecting = connecting = loop.create_future()
            try:
                self._proto = await self._connect(loop)
                connecting.set_result(None)
            except BaseException as e:
                err = e if isinstance(e, RedisConnectionError | RedisTimeoutError) else None
                connecting.set_exception(err or RedisConnectionError(str(e)))
                connecting.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                self._connecting = None
            return self._proto
        await asyncio.shield(self._connecting)
        assert self._proto is not None
        return self._proto

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: _Protocol(loop, self.timeout_s), self.host, self.port
                )
        except TimeoutError as e:
            raise RedisTimeoutError(f"Timeout connecting to Redis at {where}") from e
        except OSError as e:
            raise RedisConnectionError(f"Error connecting to Redis at {where}: {e}") from e
        setup: list[tuple] = []
        if self.password:
            if self.username:
                setup.append(("AUTH", self.username, self.password))
            else:
                setup.append(("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        try:
            for cmd in setup:
                await proto.send(cmd)
        except BaseException:
            proto.abort(RedisConnectionError("connection setup failed"))
            raise
        return proto

    def _drop(self) -> None:
        """Forget the connection of the previous event loop, closing it on that loop."""
        proto, self._proto = self._proto, None
        loop = self._loop
        if proto is None or proto.closed or loop is None or loop.is_closed():
            return
        exc = RedisConnectionError("connection dropped")
        if loop.is_running():  # another thread's loop: close it there
            loop.call_soon_threadsafe(proto.abort, exc)
        else:
            proto.abort(exc)

    async def aclose(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None and not proto.closed:
            proto.transport.close()

    async def execute(self, *args: Any) -> Any:
        proto = await self._connection()
        return await proto.send(args)


class MuxScript:
    """A Lua script run through a RedisMux; called like redis-py's AsyncScript."""

    def __init__(self, mux: RedisMux, source: str) -> None:
        self.mux = mux
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list | tuple = (), args: list | tuple = ()) -> Any:
        try:
            return await self.mux.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Not cached by this Redis yet (first use, or after a restart): EVAL caches it.
            return await self.mux.execute("EVAL", self.source, len(keys), *keys, *args)
