"""A model backend double for the page tests: the gateway's `ModelBackend` protocol with
scripted replies. It records every request (so a test can read the prompt the model got),
can hold a reply half-way until the test releases it (so "streaming" is observed, not
guessed from timing) and notes when the gateway cancels a generation.

Runs in the gateway's event loop (a uvicorn thread); the test thread talks to it through
thread-safe events and lists."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from services.rpc.dsv2.v1 import inference_pb2 as pb

DEFAULT_REPLY = ["Hello", "! ", "I am ", "a test ", "model."]


class Overloaded(Exception):
    """Stands in for services.engine.Overloaded (the model plane's load shedding), which the
    gateway recognises by name; importing the real one would pull in torch."""


class ScriptedBackend:
    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self._replies: deque[list[str]] = deque()
        self.piece_delay_s = 0.01
        self.hold_after: int | None = None  # pause after this many pieces until release()
        self.down = False  # every generate fails, like an unreachable model plane
        self.shedding = False  # every generate is shed, like an overloaded model plane
        self.accepts_images = True  # False: a text-only model (the gateway refuses pictures)
        self._released = threading.Event()
        self.holding = threading.Event()
        self.cancelled = threading.Event()
        self.completed = threading.Event()
        self._lock = threading.Lock()

    # ---- controls used by the test thread

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._replies.clear()
        self.down = False
        self.shedding = False
        self.accepts_images = True
        self.release()
        for event in (self.holding, self.cancelled, self.completed):
            event.clear()

    def reply_with(self, *pieces: str) -> None:
        """Queue the pieces of the next reply (one GenerateResponse each)."""
        with self._lock:
            self._replies.append(list(pieces))

    def hold(self, after: int) -> None:
        self.hold_after = after
        self._released.clear()
        self.holding.clear()

    def release(self) -> None:
        self.hold_after = None
        self._released.set()

    def wait(self, event: threading.Event, timeout_s: float = 10.0) -> bool:
        return event.wait(timeout_s)

    def prompts(self) -> list[list[tuple[str, str]]]:
        """(role, content) pairs of each request's chat messages, oldest request first."""
        with self._lock:
            return [[(m.role, m.content) for m in r.messages.messages] for r in self.requests]

    def images(self) -> list[list[list[tuple[str, bytes]]]]:
        """(mime_type, bytes) of each message's pictures, per request, oldest first."""
        with self._lock:
            return [
                [[(i.mime_type, i.data) for i in m.images] for m in r.messages.messages]
                for r in self.requests
            ]

    # ---- ModelBackend

    async def generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        copy = pb.GenerateRequest()
        copy.CopyFrom(req)
        with self._lock:
            self.requests.append(copy)
            pieces = self._replies.popleft() if self._replies else list(DEFAULT_REPLY)
        self.cancelled.clear()
        self.completed.clear()
        self._check_up()
        if self.shedding:
            raise Overloaded("the model plane is overloaded (test double is shedding)")
        prompt_tokens = sum(len(m.content.split()) + 4 for m in req.messages.messages)
        try:
            for index, piece in enumerate(pieces):
                if self.hold_after is not None and index >= self.hold_after:
                    self.holding.set()
                    # The release comes from the test's thread, hence a threading.Event
                    # polled here rather than an asyncio.Event.
                    while not self._released.is_set():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                yield pb.GenerateResponse(
                    text=piece,
                    token_ids=[index],
                    usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=index + 1),
                )
                await asyncio.sleep(self.piece_delay_s)
            yield pb.GenerateResponse(
                finish_reason=pb.FINISH_REASON_STOP,
                usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces)),
            )
            self.completed.set()
        except (asyncio.CancelledError, GeneratorExit):
            # The gateway closed the stream: the client went away or pressed Stop.
            self.cancelled.set()
            raise

    def _check_up(self) -> None:
        if self.down:
            raise ConnectionError("model plane unreachable (test double is down)")

    async def tokenize(self, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
        self._check_up()
        if req.HasField("messages"):
            n = sum(len(m.content.split()) + 4 for m in req.messages.messages)
        else:
            n = len(req.text.split())
        return pb.TokenizeResponse(num_tokens=n)

    async def model_info(self, req: pb.ModelInfoRequest) -> pb.ModelInfoResponse:
        self._check_up()
        return pb.ModelInfoResponse(
            model_id="dsv2-test",
            max_context_tokens=8192,
            dtype="float32",
            accepts_images=self.accepts_images,
            max_image_tokens=421 if self.accepts_images else 0,
        )

    async def health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        return pb.HealthResponse(serving=not self.down)

    def wait_until(self, predicate, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()
