"""The model-plane API (dsv2.v1.Inference) in Python, with the proto messages as types.

Ray Serve's gRPC ingress and the gateway's embedded mode both call this object. Bad input
raises InvalidRequest (callers map it to INVALID_ARGUMENT / HTTP 400) before any work.
Chat messages with pictures (ChatMessage.images) go to a DeepSeek-VL2 model
(services.engine.image_prompt); a text-only model refuses them, naming itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.engine.async_engine import AsyncEngine
from services.engine.engine import InvalidRequest
from services.engine.image_prompt import check_vl2_messages, count_images, render_vl2
from services.engine.params import SamplingParams
from services.engine.priority import Priority
from services.engine.sequence import ImageSpan, StreamDelta
from services.rpc.dsv2.v1 import inference_pb2 as pb

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 256
_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.FREE,
    pb.PRIORITY_FREE: Priority.FREE,
    pb.PRIORITY_PRO: Priority.PRO,
    pb.PRIORITY_INTERNAL: Priority.INTERNAL,
}


def priority_from_proto(value: int) -> Priority:
    try:
        return _PRIORITY[value]
    except KeyError:  # a newer client's class, or garbage: say what is known
        raise InvalidRequest(
            f"priority {value} is not a known class; use PRIORITY_FREE, PRIORITY_PRO or "
            "PRIORITY_INTERNAL"
        ) from None


def sampling_from_proto(sp: pb.SamplingParams | None) -> SamplingParams:
    if sp is None:
        return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)
    params = SamplingParams(
        temperature=float(sp.temperature),
        top_p=float(sp.top_p) if sp.top_p != 0 else 1.0,  # proto3: 0 is "not set"
        top_k=int(sp.top_k),
        seed=int(sp.seed) if sp.HasField("seed") else None,
        max_tokens=int(sp.max_tokens),
        stop=list(sp.stop),
        stop_token_ids=[int(t) for t in sp.stop_token_ids],
        ignore_eos=bool(sp.ignore_eos),
    )
    try:
        params.validate()
    except ValueError as e:  # name the message field the client set
        raise InvalidRequest(f"sampling.{e}") from None
    return params


class InferenceService:
    def __init__(
        self,
        async_engine: AsyncEngine,
        tokenizer: Any,
        model_id: str,
        *,
        num_expert_shards: int = 0,
        shard_health: Callable[[], Awaitable[list[pb.ShardHealth]]] | None = None,
    ):
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.num_expert_shards = num_expert_shards
        self.shard_health = shard_health

    @property
    def max_context_tokens(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def accepts_images(self) -> bool:
        return self.engine.engine.accepts_images

    @property
    def max_image_tokens(self) -> int:
        """The most prompt positions one picture can take (0 for a text-only model)."""
        if not self.accepts_images:
            return 0
        return self.engine.engine.model.vl2_config.preprocess.max_image_tokens

    # -- prompts ----------------------------------------------------------------------------
    def _check_messages(self, messages: Any) -> None:
        """What can be refused about chat messages without decoding a picture."""
        if not len(messages.messages):
            raise InvalidRequest("messages is empty: send at least one message")
        for i, msg in enumerate(messages.messages):
            if msg.role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {ROLES}, got {msg.role!r}")
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send token_ids")
        if self.accepts_images:
            check_vl2_messages(messages.messages)
        elif count_images(messages.messages):
            raise InvalidRequest(
                f"model {self.model_id!r} takes no images: send text only, or ask a vision "
                "model (DeepSeek-VL2)"
            )

    def _render(self, messages: Any) -> tuple[list[int], list[ImageSpan]]:
        """Chat messages -> (prompt ids, image spans); a VL2 model's conversations are in the
        VL2 format, other models' in their tokenizer's chat template."""
        self._check_messages(messages)
        if self.accepts_images:
            vl2_config = self.engine.engine.model.vl2_config
            return render_vl2(messages.messages, self.tokenizer, vl2_config)
        rendered = [{"role": m.role, "content": m.content} for m in messages.messages]
        text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False), []

    def _has_pictures(self, req: Any) -> bool:
        """Whether the request's prompt needs pictures decoded (a VL2 model's chat with
        images): work for a worker thread, not the caller's event loop."""
        return (
            self.accepts_images
            and req.WhichOneof("prompt") == "messages"
            and count_images(req.messages.messages) > 0
        )

    def _prompt(self, req: Any) -> tuple[list[int], list[ImageSpan]]:
        kind = req.WhichOneof("prompt")
        images: list[ImageSpan] = []
        if kind == "messages":
            ids, images = self._render(req.messages)
        elif kind == "text":
            if not req.text:
                raise InvalidRequest("prompt text is empty")
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer: send token_ids")
            ids = self.tokenizer.encode(req.text, add_special_tokens=False)
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
        else:
            raise InvalidRequest("set one of messages, text or token_ids")
        if not ids:
            raise InvalidRequest("prompt is empty after tokenization")
        return ids, images

    # -- RPCs -------------------------------------------------------------------------------
    def generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Validate now (raises InvalidRequest), then stream GenerateResponse messages; the
        first step raises Overloaded when the engine sheds the request's class now.

        Pictures are decoded and tiled in a worker thread when the stream starts, so a
        picture that fails to decode raises InvalidRequest there (still before any work);
        everything that needs no decoding is checked now."""
        params = sampling_from_proto(req.sampling if req.HasField("sampling") else None)
        priority = priority_from_proto(req.priority)
        if self._has_pictures(req):
            self._check_messages(req.messages)
            return self._generate_with_pictures(req, params, priority)
        ids, images = self._prompt(req)
        self._admit(ids, images, params)
        return self._generate(req.request_id or None, ids, params, priority, images)

    def _admit(self, ids: list[int], images: list[ImageSpan], params: SamplingParams) -> None:
        if len(ids) >= self.max_context_tokens:
            of_images = f" ({sum(s.num_tokens for s in images)} of them image tokens)"
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens{of_images if images else ''} but the context "
                f"window is {self.max_context_tokens} tokens (prompt + completion): shorten "
                f"the prompt by at least {len(ids) - self.max_context_tokens + 1} tokens"
            )
        self.engine.prepare(ids, params, images)

    async def _generate_with_pictures(
        self, req: pb.GenerateRequest, params: SamplingParams, priority: Priority
    ) -> AsyncIterator[pb.GenerateResponse]:
        ids, images = await asyncio.to_thread(self._prompt, req)
        self._admit(ids, images, params)
        stream = self._generate(req.request_id or None, ids, params, priority, images)
        try:
            async for response in stream:
                yield response
        finally:  # closed early: the request is aborted (its blocks freed) before this returns
            await stream.aclose()

    async def _generate(
        self,
        request_id: str | None,
        ids: list[int],
        params: SamplingParams,
        priority: Priority,
        images: list[ImageSpan],
    ) -> AsyncIterator[pb.GenerateResponse]:
        stream = self.engine.stream(request_id, ids, params, priority, images or None)
        try:
            async for delta in stream:
                yield to_response(delta)
        finally:
            await stream.aclose()

    async def tokenize(self, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
        kind = req.WhichOneof("prompt")
        if kind == "messages" and self._has_pictures(req):
            self._check_messages(req.messages)
            ids, _ = await asyncio.to_thread(self._render, req.messages)
        elif kind == "messages":
            ids, _ = self._render(req.messages)
        elif kind == "text":
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer")
            ids = self.tokenizer.encode(req.text, add_special_tokens=False)
        else:
            raise InvalidRequest("set one of messages or text")
        return pb.TokenizeResponse(num_tokens=len(ids), token_ids=ids)

    async def model_info(self, req: pb.ModelInfoRequest | None = None) -> pb.ModelInfoResponse:
        dtype = str(self.engine.engine.dtype).removeprefix("torch.")
        return pb.ModelInfoResponse(
            model_id=self.model_id,
            max_context_tokens=self.max_context_tokens,
            dtype=dtype,
            num_expert_shards=self.num_expert_shards,
            max_token_bytes=getattr(self.tokenizer, "max_token_bytes", 0),
            accepts_images=self.accepts_images,
            max_image_tokens=self.max_image_tokens,
        )

    async def health(self, req: pb.HealthRequest | None = None) -> pb.HealthResponse:
        shards = list(await self.shard_health()) if self.shard_health is not None else []
        m = self.engine.metrics
        return pb.HealthResponse(
            serving=all(s.serving for s in shards),
            shards=shards,
            running_requests=m.running,
            waiting_requests=m.waiting,
        )


def to_response(delta: StreamDelta) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=delta.text,
        token_ids=delta.token_ids,
        finish_reason=_FINISH[delta.finish_reason],
        usage=pb.Usage(
            prompt_tokens=delta.prompt_tokens,
            completion_tokens=delta.completion_tokens,
            cached_prompt_tokens=delta.cached_prompt_tokens,
        ),
        error=delta.error or "",
    )
