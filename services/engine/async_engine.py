"""Asynchronous, streaming front of the engine for servers.

The engine is single-threaded: one background thread owns it and runs the step loop,
taking commands (add, abort, stop) from a thread-safe queue between steps. Each stream gets
an asyncio.Queue on its caller's event loop; the step thread hands deltas over with
`call_soon_threadsafe`, so the event loop never waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from services.engine.engine import Engine, InvalidRequest
from services.engine.metrics import MetricsSnapshot
from services.engine.params import SamplingParams
from services.engine.priority import Priority
from services.engine.sequence import ImageSpan, StreamDelta

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        # Adds handed to the step thread but not yet in the scheduler's queue (requests,
        # tokens): load shedding counts them, or a burst between two steps would pass unseen.
        self._pending = [0, 0]
        self._pending_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: Any, **kwargs: Any) -> AsyncEngine:
        return cls(Engine.from_pretrained(path, **kwargs))

    # -- public API -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def metrics(self) -> MetricsSnapshot:
        return self.engine.metrics

    def prepare(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        images: list[ImageSpan] | None = None,
    ) -> list[int]:
        """Validate a request and return its token ids; raises InvalidRequest (no work done)."""
        try:
            params.validate()
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        ids = self.engine.encode(prompt)
        self.engine.check_prompt(ids)
        self.engine.check_images(ids, images)
        return ids

    async def stream(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: Priority = Priority.FREE,
        images: list[ImageSpan] | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield a StreamDelta per step until the request finishes.

        Raises Overloaded at the first step (before any work) when the engine sheds this
        request's class now. Closing the generator early (or `abort(request_id)`) cancels the
        request and frees its cache blocks before the close returns.
        """
        params = params or SamplingParams()
        ids = self.prepare(prompt, params, images)
        request_id = request_id or f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already streaming")
        self._ensure_started()
        with self._pending_lock:  # check and count together: no burst slips between them
            self.engine.check_overload(priority, (self._pending[0], self._pending[1]))
            self._pending[0] += 1
            self._pending[1] += len(ids)
        self._streams[request_id] = (loop, q)
        self._cmds.put(("add", request_id, ids, params, priority, images))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                await self._abort(request_id, loop)

    async def abort(self, request_id: str) -> None:
        await self._abort(request_id, asyncio.get_running_loop())

    async def _abort(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        try:
            done: asyncio.Future | None = loop.create_future()
        except RuntimeError:  # the loop is closing: still cancel, just do not wait
            done = None
        self._cmds.put(("abort", request_id, loop, done))
        if done is None:
            return
        try:
            await asyncio.shield(done)
        except (asyncio.CancelledError, RuntimeError):
            pass  # the abort still happens in the step thread

    def close(self) -> None:
        """Stop the step thread (aborting what is still running)."""
        self._closed = True
        if self._thread is not None:
            self._cmds.put(("stop",))
            self._thread.join(timeout=30)
            self._thread = None

    # -- the step thread --------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("AsyncEngine is closed")
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
                self._thread.start()

    def _deliver(self, request_id: str, item: Any, final: bool) -> None:
        entry = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:
            pass  # the caller's loop is gone

    def _handle(self, cmd: tuple[Any, ...]) -> bool:
        kind = cmd[0]
        if kind == "add":
            _, request_id, ids, params, priority, images = cmd
            try:
                self.engine.add_request(ids, params, request_id, priority, images)
            except Exception as e:  # already validated; report instead of killing the loop
                self._deliver(request_id, e, final=True)
            finally:  # queued now (or refused): no longer pending
                with self._pending_lock:
                    self._pending[0] -= 1
                    self._pending[1] -= len(ids)
        elif kind == "abort":
            _, request_id, loop, done = cmd
            delta = self.engine.abort(request_id)
            if delta is not None:  # ends a stream still being read with finish_reason "abort"
                self._deliver(request_id, delta, final=True)
            self._streams.pop(request_id, None)
            if done is not None:
                try:
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
                except RuntimeError:
                    pass  # the caller's loop is gone
        elif kind == "stop":
            for request_id in list(self.engine.seqs):
                delta = self.engine.abort(request_id)
                if delta is not None:
                    self._deliver(request_id, delta, final=True)
            return False
        return True

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                if not engine.has_unfinished():
                    if not self._handle(self._cmds.get()):
                        return
                while True:
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(cmd):
                        return
                if not engine.has_unfinished():
                    continue
                for delta in engine.step():
                    self._deliver(delta.request_id, delta, final=delta.finish_reason is not None)
            except Exception as e:  # a failed step must not hang every stream
                log.exception("engine step failed; aborting running requests")
                for request_id in list(engine.seqs):
                    delta = engine.abort(request_id)
                    if delta is not None:
                        delta.error = f"model plane error: {e}"
                        self._deliver(request_id, delta, final=True)
