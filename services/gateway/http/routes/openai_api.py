"""OpenAI-compatible endpoints: GET /v1/models, POST /v1/chat/completions (SSE or not)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from services.gateway.core.chat import (
    ChatParams,
    ChatService,
    Delta,
    Done,
    PreparedTurn,
    TurnResult,
    TurnStream,
    turn_error,
)
from services.gateway.core.errors import NotFound
from services.gateway.core.identity import Identity
from services.gateway.core.images import ImageRef, images_not_supported, message_from_parts
from services.gateway.http.deps import GatewayDep, IdentityDep
from services.gateway.http.json_route import StrictJSONRoute
from services.gateway.http.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    ModelCard,
    ModelList,
)
from services.gateway.state import Gateway
from services.rpc.dsv2.v1 import inference_pb2 as pb

router = APIRouter(tags=["openai"], route_class=StrictJSONRoute)

SSE_PING_S = 15


@router.get("/v1/models", response_model=ModelList)
async def list_models(gw: GatewayDep) -> ModelList:
    info = await gw.model_info()
    return ModelList(data=[ModelCard(id=info.model_id, created=0)])


def _params(body: ChatCompletionRequest) -> ChatParams:
    """The sampling parameters; their limits are checked with gRPC's, in ChatService."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatParams(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop,
    )


class FastJSONResponse(JSONResponse):
    """JSONResponse encoded by orjson (same JSON, a fraction of the CPU)."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


def _usage(r: TurnResult) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens,
    }


def _finish(r: TurnResult) -> str:
    return "length" if r.finish_reason == "length" else "stop"


@router.post(
    "/v1/chat/completions",
    responses={200: {"description": "A chat.completion, or SSE chat.completion.chunk events"}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    gw: GatewayDep,
    identity: IdentityDep,
):
    """Reached through FastAPI's routing only when the fast lane is off
    (DSV2_HTTP_FAST_LANE=false); otherwise fast_lane.py calls `complete` with the same
    arguments, parsed the same way."""
    return await complete(request, gw, identity, body)


async def complete(
    request: Request, gw: Gateway, identity: Identity, body: ChatCompletionRequest
) -> Response:
    return await respond(request, gw, await admit(request, gw, identity, body))


def wire_messages(
    body_messages: list[ChatMessageIn],
    gw: Gateway,
    info: pb.ModelInfoResponse,
    prefix: str = "messages",
) -> tuple[list[pb.ChatMessage], list[ImageRef]]:
    """OpenAI messages -> wire messages (text with one <image> per picture, and the pictures)
    and the pictures' refs. OpenAI's "developer" role is the newer name of "system".
    prefix "": a session turn's one message, whose parts are the body's `content`. A text-only
    model's refusal of pictures comes first, before any is decoded."""
    settings = gw.settings
    messages: list[pb.ChatMessage] = []
    refs: list[ImageRef] = []
    for i, m in enumerate(body_messages):
        field = f"{prefix}.{i}.content" if prefix else "content"
        params = [f"{field}.{j}.image_url.url" for j in m.image_positions()]
        if params and not info.accepts_images:
            raise images_not_supported(info.model_id, params[0])
        msg, msg_refs = message_from_parts(
            i,
            "system" if m.role == "developer" else m.role,
            m.pieces(),
            m.image_urls(),
            params,
            settings.limits,
            settings.image_url_host_set,
            "" if prefix else "content",
        )
        messages.append(msg)
        refs += msg_refs
    return messages, refs


@dataclass
class Admitted:
    body: ChatCompletionRequest
    chat: ChatService
    prepared: PreparedTurn
    model_id: str


async def admit(
    request: Request, gw: Gateway, identity: Identity, body: ChatCompletionRequest
) -> Admitted:
    """Everything up to and including quota admission (the only step that changes state)."""
    chat = ChatService(gw)
    info = await gw.model_info()
    if body.model != info.model_id:
        raise NotFound(
            f"The model {body.model!r} does not exist; this server serves {info.model_id!r}.",
            param="model",
            code="model_not_found",
        )
    body.refuse_unsupported()
    params = _params(body)
    messages, images = wire_messages(body.messages, gw, info)
    prepared = await chat.prepare_stateless(identity, messages, params, images)
    if prepared.lease.state is not None:
        request.state.ratelimit_headers = prepared.lease.state.headers()
    return Admitted(body, chat, prepared, info.model_id)


async def respond(request: Request, gw: Gateway, admitted: Admitted) -> Response:
    """Run the admitted turn; answer in one piece or as SSE."""
    body, info_model = admitted.body, admitted.model_id
    stream = admitted.chat.start(admitted.prepared, deltas=bool(body.stream))
    # An overloaded or failing model plane gets a 503 (or 400) here, not a hang or a 200
    # stream that fails.
    await stream.wait_started(gw.settings.model_start_timeout_s)
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(stream, completion_id, created, info_model, include_usage)
        return EventSourceResponse(events, ping=SSE_PING_S, sep="\n")

    try:
        result: TurnResult | None = None
        async for ev in stream:  # no Delta events: the result holds the whole text
            if isinstance(ev, Done):
                result = ev.result
    finally:
        stream.cancel()
    assert result is not None
    if result.finish_reason == "error":
        raise turn_error(result)
    return FastJSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": info_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": _finish(result),
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
        }
    )


async def _sse(
    stream: TurnStream, cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[dict]:
    def chunk(delta: dict, finish: str | None) -> dict:
        c = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            c["usage"] = None
        return {"data": json.dumps(c, ensure_ascii=False)}

    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        async for ev in stream:
            if isinstance(ev, Delta):
                yield chunk({"content": ev.text}, None)
                continue
            r = ev.result
            if r.finish_reason == "error":
                err = turn_error(r)
                yield {"data": json.dumps(err.body())}
            else:
                yield chunk({}, _finish(r))
            if include_usage:
                final = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(r),
                }
                yield {"data": json.dumps(final)}
        yield {"data": "[DONE]"}
    finally:
        # Client gone (or done): stop the generation; bookkeeping finishes in its own task.
        stream.cancel()
