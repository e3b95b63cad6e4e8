"""Chat sessions stored by the server: create, list, read, delete, and stream a turn."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette import EventSourceResponse

from services.gateway.core.chat import ChatParams, Delta, ReplayStream, TurnStream
from services.gateway.core.images import split_parts
from services.gateway.core.session_admission import create_session as create_stored_session
from services.gateway.core.sessions import LIST_MAX, Session
from services.gateway.core.validation import check_session_fields
from services.gateway.http.deps import ChatDep, GatewayDep, IdentityDep
from services.gateway.http.json_route import StrictJSONRoute
from services.gateway.http.routes.openai_api import wire_messages
from services.gateway.http.schemas import (
    MessageOut,
    SessionCreate,
    SessionDetail,
    SessionList,
    SessionOut,
    TurnRequest,
)
from services.rpc.dsv2.v1 import inference_pb2 as pb

router = APIRouter(tags=["sessions"], route_class=StrictJSONRoute)

SSE_PING_S = 15
DEFAULT_TEMPERATURE = 0.7


def _out(s: Session) -> SessionOut:
    return SessionOut(
        id=s.id,
        title=s.title,
        created_at=s.created_at_ms // 1000,
        updated_at=s.updated_at_ms // 1000,
    )


@router.post(
    "/v1/sessions",
    status_code=201,
    response_model=SessionOut,
    responses={429: {"description": "Too many new sessions (sessions_per_minute / _per_day)"}},
)
async def create_session(
    gw: GatewayDep, identity: IdentityDep, body: SessionCreate | None = None
) -> SessionOut:
    """Create a session. Past the tier's max_sessions, the caller's least recently updated
    sessions are deleted to make room."""
    body = body or SessionCreate()
    check_session_fields(body.title or "", body.system_prompt or "", gw.settings.limits)
    s = await create_stored_session(
        gw, identity, (body.title or "").strip(), body.system_prompt or ""
    )
    return _out(s)


@router.get("/v1/sessions", response_model=SessionList)
async def list_sessions(
    gw: GatewayDep,
    identity: IdentityDep,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = LIST_MAX,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> SessionList:
    """The caller's sessions, most recently updated first, a page at a time: while has_more,
    pass next_cursor as `after` to get the next page."""
    page = await gw.sessions.list(identity.user_id, limit, after)
    return SessionList(
        data=[_out(s) for s in page.sessions],
        has_more=page.has_more,
        next_cursor=page.next_cursor,
    )


@router.get("/v1/sessions/{session_id}", response_model=SessionDetail)
async def get_session(session_id: str, gw: GatewayDep, identity: IdentityDep) -> SessionDetail:
    """The session with its messages; a message with pictures comes back as OpenAI content
    parts (text, and image_url parts with data URLs), as it was sent."""
    s = await gw.sessions.get(identity.user_id, session_id)
    return SessionDetail(
        **_out(s).model_dump(),
        messages=[
            MessageOut(
                id=m.id,
                role=m.role,
                content=split_parts(
                    m.content, [(i.mime_type, i.data) if i.data else None for i in m.images]
                ),
                created_at=m.created_at_ms // 1000,
            )
            for m in s.messages
        ],
    )


@router.delete("/v1/sessions/{session_id}", status_code=204, response_class=Response)
async def delete_session(session_id: str, gw: GatewayDep, identity: IdentityDep) -> Response:
    await gw.sessions.delete(identity.user_id, session_id)
    return Response(status_code=204)


@router.post(
    "/v1/sessions/{session_id}/messages",
    responses={
        200: {
            "description": "SSE: data: {type: delta, text} ... then data: {type: done, ...}",
            "content": {"text/event-stream": {}},
        },
        409: {
            "description": "A turn is already in progress in this session (turn_in_progress), "
            "or the session is at its tier's messages/bytes limit (session_full)"
        },
    },
)
async def post_message(
    session_id: str,
    body: TurnRequest,
    request: Request,
    identity: IdentityDep,
    chat: ChatDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="The same key (e.g. a UUID) on every retry of one turn: a retry never "
            "stores the message twice. A turn already stored whole is replayed (`done` has "
            "`replayed: true`, nothing charged); one cut short by an error is generated again."
        ),
    ] = None,
) -> EventSourceResponse:
    params = ChatParams(
        max_tokens=body.max_tokens,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
    )
    turn = body.as_message()
    # Only a turn with pictures needs the model's facts first (cached; whether it reads them).
    info = await chat.gw.model_info() if turn.image_positions() else pb.ModelInfoResponse()
    (message,), refs = wire_messages([turn], chat.gw, info, prefix="")
    prepared = await chat.prepare_session_turn(
        identity,
        session_id,
        message.content,
        params,
        idempotency_key,
        images=list(message.images),
        refs=refs,
    )
    if prepared.lease.state is not None:
        request.state.ratelimit_headers = prepared.lease.state.headers()
    stream = chat.start(prepared)
    await stream.wait_started(chat.gw.settings.model_start_timeout_s)  # 503, not a hang
    return EventSourceResponse(_events(stream), ping=SSE_PING_S, sep="\n")


async def _events(stream: TurnStream | ReplayStream) -> AsyncIterator[dict]:
    try:
        async for ev in stream:
            if isinstance(ev, Delta):
                yield {"data": json.dumps({"type": "delta", "text": ev.text}, ensure_ascii=False)}
                continue
            r = ev.result
            done = {
                "type": "done",
                "finish_reason": r.finish_reason,
                "usage": {
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "total_tokens": r.total_tokens,
                },
                "message_id": r.message_id,
            }
            if r.error:
                done["error"] = r.error
            if r.restarting:  # the gateway's drain ended this turn: retry shortly
                done["error_code"] = "server_restarting"
            if r.replayed:
                done["replayed"] = True
            yield {"data": json.dumps(done)}
    finally:
        stream.cancel()
