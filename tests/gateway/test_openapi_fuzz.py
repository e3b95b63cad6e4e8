"""Fuzzing both APIs: whatever a client sends, no 5xx over HTTP and no UNKNOWN / INTERNAL over
gRPC. Schemathesis over /openapi.json, hand-written byte sequences on every JSON route, and
Hypothesis over gRPC Chat's and CreateSession's messages, whole or as damaged bytes.

(Schemathesis' own pytest plugin does not load under this pytest version, so the test walks
the operations itself and drives each one's Hypothesis strategy.)"""

from __future__ import annotations

import io

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from tests.gateway.conftest import ThreadedGateway, auth

EXAMPLES_PER_OPERATION = 15


def _load_schemathesis_now() -> None:
    """Import the parts of schemathesis that load lazily, here at collection. pytest rewrites
    their asserts (schemathesis is a pytest plugin) by parsing them with ``ast``; imported
    inside the test, that parse ran while the gateway's threads were compiling code as well,
    and CPython 3.11's AST constructor keeps its recursion depth per interpreter, not per
    thread: a clean-clone run once failed with "AST constructor recursion depth mismatch".
    Collection runs before any gateway thread exists."""
    tiny = {
        "openapi": "3.0.0",
        "info": {"title": "warm-up", "version": "1"},
        "paths": {
            "/x": {
                "post": {
                    "requestBody": {
                        "content": {"application/json": {"schema": {"type": "object"}}}
                    },
                    "responses": {"200": {"description": "ok"}},
                }
            }
        },
    }
    for result in schemathesis.openapi.from_dict(tiny).get_all_operations():
        result.ok().as_strategy()


_load_schemathesis_now()


def test_no_server_errors(shared_gateway: ThreadedGateway):
    schema = schemathesis.openapi.from_url(shared_gateway.http_url + "/openapi.json")
    failures: list[str] = []
    statuses: set[int] = set()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            response = case.call(base_url=shared_gateway.http_url, timeout=10)
            statuses.add(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

        check()
    assert operations >= 10
    # The fuzzing reached handlers (successes) and validation (clear 4xx), not only one side.
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert not failures, "\n".join(failures[:10])


# --- hand-written byte sequences -------------------------------------------------------------

CRAFTED = [
    b"\xff\xfe\xfd",
    b'{"content": "\xff"}',
    b'{"title": "\\ud800", "content": "\\udfff\\ud800"}',
    b'{"content": "\xed\xa0\x80"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'{"max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"temperature": 1e999, "content": "x"}',
    b'{"content": "a", "content": "b"}',
    b'{"title": "a\\u0000b", "content": "\\u0000"}',
    b"\x00" * 64,
    b'{"content": "x"' + b" " * 10_000,
]


@pytest.mark.parametrize("lane", [True, False], ids=["fast-lane", "routing"])
def test_crafted_bytes_on_every_json_route(gateway, routing_gateway, lane: bool):
    served = gateway if lane else routing_gateway
    key = gateway.create_key("fuzz-bytes", "internal")  # one Redis: valid on both
    with httpx.Client(base_url=served.http_url, timeout=30, headers=auth(key)) as c:
        session = c.post("/v1/sessions", json={"title": "t"}).json()["id"]
        routes = ["/v1/chat/completions", "/v1/sessions", f"/v1/sessions/{session}/messages"]
        for path in routes:
            for body in CRAFTED:
                for ctype in ("application/json", "text/plain"):
                    r = c.post(path, content=body, headers={"content-type": ctype})
                    assert 400 <= r.status_code < 500, (path, body[:40], r.status_code, r.text)
                    assert r.json()["error"]["message"]


# --- gRPC ------------------------------------------------------------------------------------

TEXT = st.text(max_size=40) | st.sampled_from(["", "\x00", "x" * 300, "中" * 50])
MESSAGES = st.lists(
    st.builds(
        cpb.Message, role=st.sampled_from(["user", "system", "assistant", "", "x"]), content=TEXT
    ),
    max_size=4,
)
FLOATS = st.floats(width=32) | st.sampled_from([0.0, -1.0, 50.0, float("nan"), float("inf")])
CHAT = st.builds(
    cpb.ChatRequest,
    messages=MESSAGES,
    session_id=st.sampled_from(["", "nope", "s_" + "0" * 16]),
    max_tokens=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 300),
    temperature=FLOATS,
    top_p=FLOATS,
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop=st.lists(TEXT, max_size=6),
)
SESSION = st.builds(cpb.CreateSessionRequest, title=TEXT, system_prompt=TEXT)


def _damage(raw: bytes, how: int, at: int) -> bytes:
    at = at % (len(raw) + 1)
    return [raw, raw[:at], raw[:at] + b"\xff\xfe" + raw[at:], raw + b"\x0a\x02\xc3\x28"][how % 4]


@given(
    chat=CHAT,
    session=SESSION,
    how=st.integers(0, 3),
    at=st.integers(0, 200),
    noise=st.binary(max_size=64),
)
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_grpc_never_unknown_or_internal(gateway: ThreadedGateway, chat, session, how, at, noise):
    key = gateway.create_key("fuzz-grpc", "internal")
    md = (("authorization", f"Bearer {key}"),)
    bad = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

    async def run() -> None:
        async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
            stream = ch.unary_stream("/dsv2.v1.Chat/Chat")
            unary = ch.unary_unary("/dsv2.v1.Chat/CreateSession")
            for raw in (_damage(chat.SerializeToString(), how, at), noise):
                try:
                    [r async for r in stream(raw, metadata=md, timeout=20)]
                except grpc.aio.AioRpcError as e:
                    assert e.code() not in bad, (raw[:60], e.code(), e.details())
            for raw in (_damage(session.SerializeToString(), how, at), noise):
                try:
                    await unary(raw, metadata=md, timeout=20)
                except grpc.aio.AioRpcError as e:
                    assert e.code() not in bad, (raw[:60], e.code(), e.details())

    gateway.call(run())


# --- gRPC with pictures ------------------------------------------------------------------------


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (250, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


_PNG = _png()
PICTURE = st.builds(
    cpb.MessageImage,
    data=st.sampled_from([_PNG, _PNG[:40], b"", b"GIF89a\x01"]) | st.binary(max_size=40),
    mime_type=st.sampled_from(["", "image/png", "text/plain"]) | TEXT,
)
PICTURE_MESSAGES = st.lists(
    st.builds(
        cpb.Message,
        role=st.sampled_from(["user", "user", "assistant", "system"]),
        content=TEXT | st.sampled_from(["<image>", "<image> and <image>", "look"]),
        images=st.lists(PICTURE, max_size=6),
    ),
    min_size=1,
    max_size=3,
)


@given(
    messages=PICTURE_MESSAGES,
    session_turn=st.booleans(),
    how=st.integers(0, 3),
    at=st.integers(0, 200),
)
@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_grpc_pictures_never_unknown_or_internal(vision_gateway, messages, session_turn, how, at):
    """Messages with pictures (good, cut, empty, random bytes, any declared type), as a whole
    conversation or a session turn, whole or damaged on the wire: never UNKNOWN / INTERNAL."""
    gw = vision_gateway
    key = gw.create_key("fuzz-grpc-pictures", "internal")
    md = (("authorization", f"Bearer {key}"),)
    bad = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

    async def run() -> None:
        async with grpc.aio.insecure_channel(gw.grpc_target) as ch:
            stream = ch.unary_stream("/dsv2.v1.Chat/Chat")
            req = cpb.ChatRequest(messages=messages, max_tokens=2)
            if session_turn:
                create = ch.unary_unary(
                    "/dsv2.v1.Chat/CreateSession",
                    request_serializer=cpb.CreateSessionRequest.SerializeToString,
                    response_deserializer=cpb.Session.FromString,
                )
                req.session_id = (await create(cpb.CreateSessionRequest(), metadata=md)).id
                del req.messages[1:]
            try:
                [r async for r in stream(_damage(req.SerializeToString(), how, at), metadata=md)]
            except grpc.aio.AioRpcError as e:
                assert e.code() not in bad, (e.code(), e.details())

    gw.call(run())
