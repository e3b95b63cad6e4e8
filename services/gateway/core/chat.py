"""One chat turn, shared by the OpenAI endpoint, the sessions API and gRPC Chat: validate it
(validation.py, the same caps for HTTP and gRPC), admit it against the quotas with a token
reservation bounded from its UTF-8 size, and only then plan the prompt (exact token counts
from the model plane, history trimmed to the context window), stream it, and always finish
it: refund unused tokens, release the stream slot and the session's turn lock, store the
(possibly partial) reply.

Admission comes before any tokenization so that every request that makes the model plane
work is counted, and a refusal after admission (context exceeded) refunds the reserved
tokens but keeps the request counted.

The generation runs in a task of its own (`TurnStream`); the client only reads its events, so
a client that goes away cancels the generation but never the bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.gateway.backends.model_plane import (
    BackendInvalidRequest,
    BackendOverloaded,
    BackendUnavailable,
)
from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS, retry_while_away
from services.gateway.core.drain import RESTARTING_MESSAGE, restarting_error
from services.gateway.core.errors import (
    GatewayError,
    InvalidInput,
    RateLimited,
    ServiceUnavailable,
    model_overloaded,
    model_unavailable,
)
from services.gateway.core.idempotency import check_idempotency_key, earlier_attempt
from services.gateway.core.identity import Identity
from services.gateway.core.images import (
    IMAGE_PLACEHOLDER,
    ImageRef,
    check_images,
    neutralise_markers,
)
from services.gateway.core.quotas import Lease
from services.gateway.core.sessions import (
    Session,
    StoredImage,
    StoredMessage,
    keyed_message_id,
    new_message_id,
    now_ms,
)
from services.gateway.core.validation import (
    check_messages,
    check_sampling,
    check_turn_content,
    prompt_token_bound,
    prompt_token_floor,
)
from services.gateway.state import Gateway
from services.rpc.dsv2.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)


_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}
_PRIORITY = {
    "free": pb.PRIORITY_FREE,
    "pro": pb.PRIORITY_PRO,
    "internal": pb.PRIORITY_INTERNAL,
}


@dataclass
class ChatParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class TurnResult:
    text: str = ""
    finish_reason: str = "error"  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    invalid_input: bool = False  # the model plane refused the request itself (a 400, not a 503)
    restarting: bool = False  # stopped by the gateway's drain (a 503 "server restarting")
    shed: bool = False  # refused by the model plane's load shedding (503 + Retry-After)
    message_id: str | None = None
    replayed: bool = False  # a retried turn answered from what an earlier attempt stored

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    result: TurnResult


@dataclass
class PreparedTurn:
    identity: Identity
    request: pb.GenerateRequest
    prompt_tokens: int
    max_tokens: int
    lease: Lease
    request_id: str
    # Session turns only:
    session: Session | None = None
    turn_token: str | None = None
    reply_id: str | None = None
    ttl_s: int = 0
    # Stored together with the reply when the turn ends; a turn with no reply stores neither.
    user_message: StoredMessage | None = None
    # A retry (same Idempotency-Key) of a turn whose earlier attempt stored a partial reply:
    # the index of that attempt's user message, replaced with this attempt's turn.
    replace_from: int | None = None
    # A retry of a turn that was stored whole: answered from the store, nothing generated.
    replay: StoredMessage | None = None


class ChatService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # --- planning -------------------------------------------------------------------------

    async def count_tokens(self, messages: list[pb.ChatMessage]) -> int:
        try:
            resp = await self.gw.backend.tokenize(
                pb.TokenizeRequest(messages=pb.ChatMessages(messages=messages))
            )
        except BackendInvalidRequest as e:
            raise InvalidInput(f"The model plane refused the messages: {e}") from e
        except BackendUnavailable as e:
            raise model_unavailable(str(e)) from e
        return resp.num_tokens

    def _check_params(self, identity: Identity, params: ChatParams) -> None:
        check_sampling(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop,
            limits=self.gw.settings.limits,
        )
        limit = identity.tier.max_tokens_per_request
        if params.max_tokens is not None and params.max_tokens > limit:
            raise InvalidInput(
                f"max_tokens is {params.max_tokens}, above the limit of {limit} per request "
                f"for the {identity.tier.name} tier.",
                param="max_tokens",
                code="max_tokens_too_large",
            )

    def _reservation(
        self,
        identity: Identity,
        content_bytes: int,
        num_messages: int,
        params: ChatParams,
        info: pb.ModelInfoResponse,
        num_images: int = 0,
    ) -> int:
        """Tokens to reserve before tokenizing: a sound upper bound of prompt + completion,
        each picture bounded by the most tokens one can take (ModelInfoResponse
        .max_image_tokens; the whole context when the model does not say). Never above the
        context window, which no admitted request can exceed."""
        ctx = info.max_context_tokens
        bound = prompt_token_bound(content_bytes, num_messages, self.gw.settings.limits)
        bound += num_images * (info.max_image_tokens or ctx)
        return min(ctx, bound + (params.max_tokens or identity.tier.max_tokens_per_request))

    @staticmethod
    def _check_floor(
        content_bytes: int, params: ChatParams, info: pb.ModelInfoResponse, param: str
    ) -> None:
        """Refuse from the byte length alone when it proves the prompt cannot fit: no token
        stands for more than info.max_token_bytes bytes. Saves tokenizing it."""
        floor = prompt_token_floor(content_bytes, info.max_token_bytes)
        need = floor + (params.max_tokens or 1)
        if floor and need > info.max_context_tokens:
            raise InvalidInput(
                f"The messages are {content_bytes} bytes, at least {floor} tokens, which with "
                f"max_tokens cannot fit the model's context window of "
                f"{info.max_context_tokens} tokens; shorten them.",
                param=param,
                code="context_length_exceeded",
            )

    async def _fit(
        self, identity: Identity, messages: list[pb.ChatMessage], max_tokens: int | None, ctx: int
    ) -> tuple[int, int]:
        """(prompt tokens, max_tokens to use), or InvalidInput when they cannot fit."""
        prompt = await self.count_tokens(messages)
        room = ctx - prompt
        if max_tokens is None:
            if room < 1:
                raise InvalidInput(
                    f"The messages are {prompt} tokens, which fills the model's context window "
                    f"of {ctx} tokens; shorten them.",
                    param="messages",
                    code="context_length_exceeded",
                )
            return prompt, min(identity.tier.max_tokens_per_request, room)
        if max_tokens > room:
            raise InvalidInput(
                f"The messages are {prompt} tokens and max_tokens is {max_tokens}: together "
                f"{prompt + max_tokens}, over the model's context window of {ctx} tokens. "
                "Shorten the messages or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        return prompt, max_tokens

    def _generate_request(
        self,
        identity: Identity,
        request_id: str,
        messages: list[pb.ChatMessage],
        params: ChatParams,
        max_tokens: int,
        session_id: str = "",
    ) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=max_tokens,
            stop=params.stop,
        )
        if params.seed is not None:
            sampling.seed = params.seed
        return pb.GenerateRequest(
            request_id=request_id,
            messages=pb.ChatMessages(messages=messages),
            sampling=sampling,
            priority=_PRIORITY[identity.tier.priority],
            # The model plane routes a conversation's turns to the replica caching it.
            session_id=session_id or conversation_key(messages),
        )

    async def _admit(self, identity: Identity, reserve: int, model: str, images: int = 0) -> Lease:
        """Quota admission for `model` (its own limits where the tier has some); counts the
        request, or its refusal, in the user's usage of the day, and its pictures against
        images_per_day."""
        try:
            return await self.gw.quotas.admit(
                identity.subjects(self.gw.identity.anonymous_ip_tier),
                reserve,
                check=identity.key_check,
                model=model,
                usage_user=identity.user_id,
                images=images,
            )
        except RateLimited as e:
            self.gw.metrics.quota_rejections.labels(e.code or "unknown").inc()
            raise

    async def _refund_all(self, lease: Lease, exc: BaseException) -> None:
        """A request refused after admission: give every reserved token back (the request
        itself stays counted), without letting a Redis hiccup hide the refusal. The error is
        marked `after_admission`: admission confirmed the caller's key and counted the
        request, so nobody must retry it as if nothing had been taken (fast_lane.py)."""
        with contextlib.suppress(AttributeError):
            exc.after_admission = True  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await self.gw.quotas.finish(lease, 0)

    async def prepare_stateless(
        self,
        identity: Identity,
        messages: list[pb.ChatMessage],
        params: ChatParams,
        images: list[ImageRef] | None = None,
    ) -> PreparedTurn:
        """A conversation given whole by the client (OpenAI endpoint, gRPC without session).
        `images`: the pictures the messages carry (core/images.py), checked from their
        headers before admission and decoded after it, before any model-plane call."""
        images = images or []
        size = check_messages(messages, self.gw.settings.limits)
        self._check_params(identity, params)
        info = await self.gw.model_info()  # cached: no model-plane work per request
        ctx = info.max_context_tokens
        check_images(messages, images, self.gw.settings.limits, info)
        reserve = self._reservation(identity, size, len(messages), params, info, len(images))
        # The one model served; the OpenAI route has already refused any other id.
        lease = await self._admit(identity, reserve, info.model_id, len(images))
        try:
            await self.gw.images.resolve(messages, images)
            self._check_floor(size, params, info, "messages")
            prompt, max_tokens = await self._fit(identity, messages, params.max_tokens, ctx)
        except BaseException as e:
            await self._refund_all(lease, e)
            raise
        request_id = "req_" + secrets.token_hex(8)
        return PreparedTurn(
            identity=identity,
            request=self._generate_request(identity, request_id, messages, params, max_tokens),
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            lease=lease,
            request_id=request_id,
        )

    async def prepare_session_turn(
        self,
        identity: Identity,
        session_id: str,
        content: str,
        params: ChatParams,
        idempotency_key: str | None = None,
        *,
        images: list[pb.Image] | None = None,
        refs: list[ImageRef] | None = None,
        field: str = "content",
    ) -> PreparedTurn:
        """A turn in a stored session: lock it (409 if busy or full), admit from the history's
        size, trim the history to the context window. Nothing is stored yet: the user's message
        is stored with the reply when the turn ends (TurnStream._finalize), so a failed turn
        leaves no trace in the history. Any failure releases the lock (and the reservation).

        `content` holds one `<image>` per entry of `images` (refs: where each came from, see
        core/images.py); the pictures are stored with the message, and the session's earlier
        pictures go to the model with their messages. `field`: the message's name in errors.

        With an idempotency key, a retry of a turn never stores its user message twice: if an
        earlier attempt's turn is stored whole, it is replayed (nothing generated or charged);
        if it stored only a partial reply (the model plane failed mid-reply) and is still the
        session's last turn, this attempt generates again and replaces it."""
        limits = self.gw.settings.limits
        images, refs = images or [], refs or []
        check_turn_content(content, limits, num_images=len(images))
        self._check_params(identity, params)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        info = await self.gw.model_info()
        user_msg = pb.ChatMessage(role="user", content=content, images=images)
        check_images([user_msg], refs, limits, info, field=field)
        # Fetched pictures are not here yet: each counts as the largest allowed.
        image_bytes = sum(
            limits.max_image_bytes if r.url else len(images[r.index].data) for r in refs
        )
        sessions = self.gw.sessions
        token = await sessions.begin_turn(
            identity.user_id, identity.tier, session_id, content, image_bytes=image_bytes
        )
        try:
            session = await sessions.get(identity.user_id, session_id)
            user_id = (
                keyed_message_id(session_id, idempotency_key)
                if idempotency_key is not None
                else new_message_id()
            )
            ids = (
                None
                if any(r.url for r in refs)
                else [StoredImage.of(i.data, "").id for i in images]
            )
            replace_from, replay = earlier_attempt(session, user_id, content, ids)
            if replay is not None:
                await sessions.end_turn(session_id, token)
                return PreparedTurn(
                    identity=identity,
                    request=pb.GenerateRequest(),
                    prompt_tokens=0,
                    max_tokens=0,
                    lease=Lease(lease_id="", reserved=0, accounted=False),
                    request_id="req_" + secrets.token_hex(8),
                    session=session,
                    replay=replay,
                )
            if replace_from is not None:  # the history before the earlier attempt
                session.messages = session.messages[:replace_from]
            texts = [session.system_prompt, *(m.content for m in session.messages), content]
            sizes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
            size = sum(sizes)
            # The prompt carries at most max_images_per_request pictures (_trim drops older
            # messages to keep to it).
            stored_images = sum(len(m.images) for m in session.messages)
            num_images = min(stored_images + len(images), limits.max_images_per_request)
            reserve = self._reservation(identity, size, len(texts), params, info, num_images)
            lease = await self._admit(identity, reserve, info.model_id, len(images))
            try:
                await self.gw.images.resolve([user_msg], refs)
                # Older messages are trimmed if need be; the system prompt and the new message
                # must fit.
                self._check_floor(sizes[0] + sizes[-1], params, info, "content")
                messages, prompt, max_tokens = await self._trim(identity, session, user_msg, params)
            except BaseException as e:
                await self._refund_all(lease, e)
                raise
        except BaseException:
            with contextlib.suppress(Exception):
                await sessions.end_turn(session_id, token)
            raise
        request_id = "req_" + secrets.token_hex(8)
        stored = [StoredImage.of(i.data, i.mime_type) for i in user_msg.images]
        return PreparedTurn(
            identity=identity,
            request=self._generate_request(
                identity, request_id, messages, params, max_tokens, session.id
            ),
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            lease=lease,
            request_id=request_id,
            session=session,
            turn_token=token,
            reply_id=new_message_id(),
            ttl_s=identity.tier.session_ttl_s,
            user_message=StoredMessage(user_id, "user", content, now_ms(), images=stored),
            replace_from=replace_from,
        )

    async def _trim(
        self,
        identity: Identity,
        session: Session,
        user_msg: pb.ChatMessage,
        params: ChatParams,
    ) -> tuple[list[pb.ChatMessage], int, int]:
        """Drop the oldest stored messages (never the system prompt) until the prompt plus the
        reply fits the context window, and its pictures max_images_per_request. Binary
        search: O(log n) tokenize calls."""
        info = await self.gw.model_info()
        ctx = info.max_context_tokens
        tier_max = identity.tier.max_tokens_per_request
        need = params.max_tokens or min(tier_max, max(1, ctx // 4))
        system = (
            [pb.ChatMessage(role="system", content=session.system_prompt)]
            if session.system_prompt
            else []
        )
        history = [history_message(m) for m in session.messages]

        def build(start: int) -> list[pb.ChatMessage]:
            return [*system, *history[start:], user_msg]

        counts: dict[int, int] = {}

        async def count(start: int) -> int:
            if start not in counts:
                counts[start] = await self.count_tokens(build(start))
            return counts[start]

        # The first message that may start the history: from there on, the pictures fit.
        room = self.gw.settings.limits.max_images_per_request - len(user_msg.images)
        first = len(history)
        while first > 0 and len(history[first - 1].images) <= room:
            room -= len(history[first - 1].images)
            first -= 1
        start = first
        if await count(first) + need > ctx:
            lo, hi = first + 1, len(history)
            if await count(hi) + need > ctx:
                smallest = await count(hi)
                raise InvalidInput(
                    f"The message is too long: with the system prompt it is {smallest} tokens, "
                    f"and the reply needs {need} more, over the model's context window of "
                    f"{ctx} tokens.",
                    param="content",
                    code="context_length_exceeded",
                )
            while lo < hi:
                mid = (lo + hi) // 2
                if await count(mid) + need <= ctx:
                    hi = mid
                else:
                    lo = mid + 1
            start = lo
        prompt = await count(start)
        max_tokens = params.max_tokens or min(tier_max, ctx - prompt)
        return build(start), prompt, max_tokens

    # --- running --------------------------------------------------------------------------

    def start(self, prepared: PreparedTurn, *, deltas: bool = True) -> TurnStream | ReplayStream:
        """Run the turn. deltas=False: only the final Done event is queued (its result holds
        the whole text), for callers that answer in one piece."""
        if prepared.replay is not None:
            return ReplayStream(prepared.replay, deltas=deltas)
        return TurnStream(self.gw, prepared, deltas=deltas)


def history_message(m: StoredMessage) -> pb.ChatMessage:
    """A stored message as the model plane gets it: its pictures attached; the text `<image>`
    in a reply neutralised (only the user's markers stand for pictures); a picture no longer
    stored (evicted under memory pressure) left out together with its marker."""
    if m.role != "user":
        return pb.ChatMessage(role=m.role, content=neutralise_markers(m.content))
    if not m.images:
        return pb.ChatMessage(role=m.role, content=m.content)
    pieces = m.content.split(IMAGE_PLACEHOLDER)
    content = [pieces[0]]
    images = []
    for image, after in zip(m.images, pieces[1:], strict=False):
        if image.data:
            content.append(IMAGE_PLACEHOLDER)
            images.append(pb.Image(data=image.data, mime_type=image.mime_type))
        content.append(after)
    return pb.ChatMessage(role=m.role, content="".join(content), images=images)


def conversation_key(messages: list[pb.ChatMessage]) -> str:
    """A routing key for a conversation sent whole (OpenAI API): a hash of its opening (the
    messages up to the first user message), the same on every later turn of that chat."""
    opening = hashlib.sha256()
    for m in messages:
        opening.update(f"{m.role}\0{m.content}\0".encode("utf-8", "surrogatepass"))
        if m.role == "user":
            break
    return "conv-" + opening.hexdigest()[:32]


def turn_error(r: TurnResult) -> GatewayError:
    """What to answer for a turn that ended in error: 400 when the model plane refused the
    input, 503 "server restarting" when the gateway's drain stopped it, 503 "overloaded" when
    the model plane shed it, else 503."""
    if r.shed:
        return model_overloaded()
    if r.invalid_input:
        return InvalidInput(f"The model plane refused the request: {r.error}")
    if r.restarting:
        return restarting_error()
    return model_unavailable(r.error)


class TurnStream:
    """Runs the generation and its bookkeeping in a task; iterate to get Delta... then Done.
    `cancel()` (e.g. when the client disconnected) stops the generation; the partial reply is
    still stored and the unused tokens refunded."""

    def __init__(self, gw: Gateway, prepared: PreparedTurn, *, deltas: bool = True) -> None:
        self.gw = gw
        self.p = prepared
        self.deltas = deltas
        self._renewing: asyncio.Task | None = None
        self.queue: asyncio.Queue[Delta | Done] = asyncio.Queue()
        self.result = TurnResult(prompt_tokens=prepared.prompt_tokens, message_id=prepared.reply_id)
        self.started_at = time.perf_counter()
        self._generating = True
        self._restart = False
        self._gave_up = False  # wait_started timed out: the caller got a 503
        # Set at the model plane's first message, or when the turn ends without one.
        self._answered = asyncio.Event()
        self.task = gw.track(asyncio.create_task(self._run(), name=prepared.request_id))
        gw.drain_state.add(self)

    async def __aiter__(self) -> AsyncIterator[Delta | Done]:
        while True:
            ev = await self.queue.get()
            yield ev
            if isinstance(ev, Done):
                return

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()

    def stop_for_restart(self) -> None:
        """The drain's grace is over: end the generation with a "server restarting" error
        (bookkeeping as for any ending: the partial reply is stored, unused tokens refunded)."""
        if self._generating and not self.task.done():
            self._restart = True
            self.task.cancel()

    async def wait_started(self, timeout_s: float) -> None:
        """Wait (at most timeout_s) until the model plane starts answering, so an overloaded
        or failing plane gets a proper 503 / gRPC status instead of a hang or an accepted
        stream that fails. Raises the error to answer with; the turn is then cancelled (its
        bookkeeping still runs)."""
        try:
            await asyncio.wait_for(self._answered.wait(), timeout_s)
        except asyncio.CancelledError:  # the caller went away: so does the generation
            self.cancel()
            raise
        except TimeoutError:
            self._gave_up = True
            self.cancel()
            self.gw.metrics.backend_errors.inc()
            raise ServiceUnavailable(
                f"The model plane did not start answering within {timeout_s:g} s (overloaded); "
                "please retry shortly.",
                code="model_overloaded",
                headers={"Retry-After": str(max(1, round(timeout_s)))},
            ) from None
        r = self.result
        if self.task.done() and r.finish_reason == "error" and not r.text:
            raise turn_error(r)

    def _renew_later(self) -> asyncio.TimerHandle:
        """Keep the stream lease and the turn lock alive while the generation runs: a timer
        every lease/3 (no task per turn: most turns end before the first renewal)."""
        period = max(0.05, self.gw.settings.stream_lease_s / 3)
        return asyncio.get_running_loop().call_later(period, self._renew_now)

    def _renew_now(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew_once())
        self._renew_timer = self._renew_later()

    async def _renew_once(self) -> None:
        with contextlib.suppress(Exception):
            await self.gw.quotas.renew(self.p.lease)
            if self.p.session is not None and self.p.turn_token:
                await self.gw.sessions.renew_turn(self.p.session.id, self.p.turn_token)

    async def _run(self) -> None:
        r = self.result
        m = self.gw.metrics
        m.active_streams.inc()
        self._renew_timer = self._renew_later()
        agen = self.gw.backend.generate(self.p.request)
        parts: list[str] = []
        counted = 0
        first = True
        try:
            async for resp in agen:
                self._answered.set()
                if resp.text:
                    if first:
                        m.ttft.observe(time.perf_counter() - self.started_at)
                        first = False
                    parts.append(resp.text)
                    if self.deltas:
                        self.queue.put_nowait(Delta(resp.text))
                counted += len(resp.token_ids)
                if resp.usage.prompt_tokens:
                    r.prompt_tokens = resp.usage.prompt_tokens
                if resp.usage.completion_tokens:
                    counted = max(counted, resp.usage.completion_tokens)
                if resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    r.finish_reason = _FINISH.get(resp.finish_reason, "error")
                    r.error = resp.error or ("" if r.finish_reason != "error" else "aborted")
                    break
            else:
                r.finish_reason, r.error = "error", "the model plane ended the stream early"
        except asyncio.CancelledError:
            r.finish_reason = "cancelled"
            if self._restart:
                r.finish_reason, r.error, r.restarting = "error", RESTARTING_MESSAGE, True
            elif self._gave_up:
                r.finish_reason, r.error = "error", "the model plane did not start answering"
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        except BackendOverloaded as e:
            # Shed before any work: 503 overloaded, and (as for any turn that failed before any
            # text, below) the whole reservation is refunded.
            m.backend_errors.inc()
            r.finish_reason, r.error, r.shed = "error", str(e), True
            log.info("generation %s shed: %s", self.p.request_id, e)
        except (BackendUnavailable, BackendInvalidRequest) as e:
            m.backend_errors.inc()
            r.finish_reason, r.error = "error", str(e)
            r.invalid_input = isinstance(e, BackendInvalidRequest)
            log.warning("generation %s failed: %s", self.p.request_id, e)
        except Exception as e:  # never leave a turn unfinished
            m.backend_errors.inc()
            r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
            log.exception("generation %s failed", self.p.request_id)
        finally:
            self._generating = False
            self._renew_timer.cancel()
            if self._renewing is not None:
                self._renewing.cancel()
            m.active_streams.dec()
        try:
            with contextlib.suppress(BaseException):
                await agen.aclose()
            r.text = "".join(parts)
            r.completion_tokens = counted
            if r.finish_reason == "error" and not r.text:
                # The service failed before delivering anything: the caller gets an error
                # (503, or a `done` with zero usage) and is charged nothing for it.
                r.prompt_tokens = r.completion_tokens = 0
            # The bookkeeping runs shielded: cancelling this task again must not cut it short.
            fin = self.gw.track(asyncio.create_task(self._finalize()))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fin)
            self.queue.put_nowait(Done(r))
            self._answered.set()
        finally:
            self.gw.drain_state.discard(self)

    async def _finalize(self) -> None:
        r, p, m = self.result, self.p, self.gw.metrics
        m.child(m.turns, r.finish_reason).inc()
        m.child(m.tokens, "prompt").inc(r.prompt_tokens)
        m.child(m.tokens, "completion").inc(r.completion_tokens)
        # Each write below is safe to repeat, and is retried while Redis is briefly away (a
        # restart, a failover): the reply exists already, so storing it and settling its
        # tokens is worth a short wait before the client's `done`.
        if p.session is not None:
            # The user's message and the (possibly partial) reply, together; a turn that
            # produced no text stores nothing, so histories never read "user, user, ...".
            if r.text and p.user_message is not None:
                reply = StoredMessage(
                    p.reply_id or new_message_id(), "assistant", r.text, now_ms(), r.finish_reason
                )
                try:
                    stored = await retry_while_away(
                        lambda: self.gw.sessions.append(
                            p.identity.user_id,
                            p.session.id,
                            [p.user_message, reply],
                            p.ttl_s,
                            replace_from=p.replace_from,
                        )
                    )
                except (*REDIS_DOWN_ERRORS, GatewayError) as e:
                    log.warning("could not store the turn of %s: %s", p.request_id, e)
                    stored = False
                if not stored:
                    r.message_id = None
            else:
                r.message_id = None
        try:
            await retry_while_away(
                lambda: self.gw.quotas.finish(p.lease, r.prompt_tokens, r.completion_tokens)
            )
        except REDIS_DOWN_ERRORS as e:  # the lease expires, and its reservation is refunded
            log.warning("could not settle the tokens of %s: %s", p.request_id, e)
        if p.session is not None and p.turn_token:
            try:
                await retry_while_away(
                    lambda: self.gw.sessions.end_turn(p.session.id, p.turn_token)
                )
            except REDIS_DOWN_ERRORS as e:  # the lock expires by itself
                log.warning("could not release turn lock of %s: %s", p.request_id, e)


class ReplayStream:
    """A retried turn answered from the store: the stored reply as one Delta, then Done
    (replayed, no usage: nothing was generated or charged). Same interface as TurnStream."""

    def __init__(self, reply: StoredMessage, *, deltas: bool = True) -> None:
        self.reply = reply
        self.deltas = deltas
        self.result = TurnResult(
            text=reply.content,
            finish_reason=reply.finish_reason or "stop",
            message_id=reply.id,
            replayed=True,
        )

    async def __aiter__(self) -> AsyncIterator[Delta | Done]:
        if self.deltas and self.reply.content:
            yield Delta(self.reply.content)
        yield Done(self.result)

    def cancel(self) -> None:
        pass

    async def wait_started(self, timeout_s: float) -> None:
        pass
