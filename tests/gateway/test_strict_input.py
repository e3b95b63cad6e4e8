"""Bad input gets a clear 400 / INVALID_ARGUMENT naming what to fix, the same on HTTP's fast
lane, on FastAPI's routing and on gRPC; never a 5xx, and nothing is charged for it."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.conftest import ThreadedGateway, auth
from tests.gateway.test_fast_lane import _normal

GOOD = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
JSON = {"content-type": "application/json"}


@pytest.fixture
def routed(routing_gateway: ThreadedGateway) -> ThreadedGateway:
    routing_gateway.gateway.quotas.memo.clear()
    return routing_gateway


def post(gw: ThreadedGateway, body: bytes, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=gw.http_url, timeout=30) as c:
        return c.post("/v1/chat/completions", content=body, headers={**JSON, **headers})


# --- hand-written byte sequences -------------------------------------------------------------

CRAFTED = [
    ("invalid utf-8", b'{"model": "dsv2-scripted", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("lone surrogate escape", b'{"model": "dsv2-scripted", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("encoded surrogate", b'{"model": "dsv2-scripted", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    ("100000-deep nesting", b"[" * 100_000 + b"]" * 100_000),
    ("deep nesting in a field", b'{"model": "dsv2-scripted", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("huge integer", b'{"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}"),
    ("huge float", b'{"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}'),
    ("duplicate keys", b'{"model": "dsv2-scripted", "model": "other", "messages": [{"role": "user", "content": "hi"}]}'),
    ("NUL escape in content", b'{"model": "dsv2-scripted", "messages": [{"role": "user", "content": "a\\u0000b"}]}'),
    ("raw NUL byte", b'{"model": "dsv2-scripted",\x00 "messages": []}'),
]  # fmt: skip


@pytest.mark.parametrize("name,body", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_bodies_get_400_on_both_paths(gateway, routed, name, body):
    key = gateway.create_key("crafted", "internal")
    fast, slow = post(gateway, body, auth(key)), post(routed, body, auth(key))
    assert fast.status_code == 400, (name, fast.text)
    err = fast.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert _normal(fast) == _normal(slow), name
    assert gateway.backend.tokenize_calls == 0 and not gateway.backend.requests


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"stop": [""]}, "stop.0"),
        ({"stop": ["x" * 257]}, "stop.0"),
        ({"top_p": -1}, "top_p"),
    ],
)
def test_wrong_types_and_unsupported_fields_are_named(gateway, routed, extra, param):
    key = gateway.create_key("strict", "internal")
    body = json.dumps({**GOOD, **extra}).encode()
    fast, slow = post(gateway, body, auth(key)), post(routed, body, auth(key))
    assert fast.status_code == 400, fast.text
    assert fast.json()["error"]["param"] == param
    assert _normal(fast) == _normal(slow)
    assert gateway.backend.requests == [] and gateway.backend.tokenize_calls == 0


def test_defaults_of_unsupported_fields_are_accepted(gateway):
    key = gateway.create_key("defaults", "internal")
    extra = {"tools": [], "tool_choice": "none", "logprobs": False, "n": 1, "user": "u"}
    extra |= {"response_format": {"type": "text"}, "presence_penalty": 0, "metadata": {"a": 1}}
    r = post(gateway, json.dumps({**GOOD, **extra}).encode(), auth(key))
    assert r.status_code == 200, r.text


# --- the property: fast lane == FastAPI routing for any body ---------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", 1]),
        "content": st.text(max_size=12) | JSON_VALUES,
    }
)
FIELDS = {
    "model": st.sampled_from(["dsv2-scripted", "", "other"]) | JSON_VALUES,
    "messages": st.lists(MESSAGE, max_size=3) | JSON_VALUES,
    "max_tokens": st.integers(-2, 300) | JSON_VALUES,
    "temperature": st.floats(-1, 3) | JSON_VALUES,
    "top_p": st.floats(-1, 2) | JSON_VALUES,
    "stop": st.lists(st.text(max_size=5), max_size=5) | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES,
    "n": st.integers(0, 3),
    "tools": JSON_VALUES,
    "logprobs": JSON_VALUES,
}  # fmt: skip
BODIES = st.fixed_dictionaries({}, optional=FIELDS)


def _mutate(raw: bytes, how: int, where: int) -> bytes:
    """Byte-level damage a hand-written client might do."""
    at = where % (len(raw) + 1)
    return [
        raw,
        raw[:at] + b"\xff" + raw[at:],
        raw[:at] + b"\\ud800" + raw[at:],
        raw[:at],
        raw[:at] + b"\x00" + raw[at:],
        raw.replace(b'"model"', b'"model": 1, "model"', 1),
    ][how % 6]


@given(body=BODIES, how=st.integers(0, 5), where=st.integers(0, 400), ascii_only=st.booleans())
@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_fast_lane_and_routing_accept_and_refuse_alike(
    gateway, routed, body, how, where, ascii_only
):
    key = gateway.create_key("property", "internal")
    raw = _mutate(json.dumps(body, ensure_ascii=ascii_only).encode(), how, where)
    fast, slow = post(gateway, raw, auth(key)), post(routed, raw, auth(key))
    assert fast.status_code < 500, fast.text
    assert _normal(fast) == _normal(slow)


# --- gRPC: the same checks, before admission -------------------------------------------------


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _chat(target: str, key: str, req: cpb.ChatRequest) -> list[cpb.ChatResponse]:
    async with grpc.aio.insecure_channel(target) as ch:
        return [r async for r in chat_pb2_grpc.ChatStub(ch).Chat(req, metadata=_md(key))]


def _hi(**kw) -> cpb.ChatRequest:
    return cpb.ChatRequest(messages=[cpb.Message(role="user", content="hi")], **kw)


GRPC_REFUSALS = [
    (_hi(top_p=-1), "top_p"),
    (_hi(top_p=50), "top_p"),
    (_hi(top_p=float("nan")), "top_p"),
    (_hi(top_p=float("inf")), "top_p"),
    (_hi(temperature=float("nan")), "temperature"),
    (_hi(stop=[""]), "stop[0]"),
    (_hi(stop=["x" * 100_000]), "stop[0]"),
    (_hi(stop=["a"] * 5), "stop holds"),
    (_hi(max_tokens=-1), "max_tokens"),
    (cpb.ChatRequest(messages=[cpb.Message(role="user", content="x" * 200_000)]), "messages[0].content"),
    (cpb.ChatRequest(messages=[cpb.Message(role="user", content="a\x00b")]), "NUL"),
    (cpb.ChatRequest(messages=[cpb.Message(role="tool", content="a")]), "role"),
    (cpb.ChatRequest(messages=[]), "messages"),
]  # fmt: skip


@pytest.mark.parametrize("req,named", GRPC_REFUSALS, ids=[n for _, n in GRPC_REFUSALS])
async def test_grpc_refuses_what_http_refuses_without_charging(gateway, req, named):
    key = gateway.create_key("grpc-strict", "budget")  # 600 tokens per day
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _chat(gateway.grpc_target, key, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in e.value.details()
    assert gateway.backend.requests == [] and gateway.backend.tokenize_calls == 0
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        usage = await chat_pb2_grpc.ChatStub(ch).GetUsage(cpb.UsageRequest(), metadata=_md(key))
    assert usage.tokens_per_day.remaining == 600  # nothing charged


async def test_grpc_create_session_caps(gateway):
    key = gateway.create_key("grpc-sessions", "internal")
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        stub = chat_pb2_grpc.ChatStub(ch)
        for req, named in [
            (cpb.CreateSessionRequest(title="t", system_prompt="y" * 2_000_000), "system_prompt"),
            (cpb.CreateSessionRequest(title="x" * 201), "title"),
            (cpb.CreateSessionRequest(title="a\x00b"), "title"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CreateSession(req, metadata=_md(key))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert named in e.value.details()
        listed = await stub.ListSessions(cpb.ListSessionsRequest(), metadata=_md(key))
        assert list(listed.sessions) == []


async def test_grpc_undecodable_message_is_invalid_argument(gateway):
    """A string field that is not UTF-8 (protobuf cannot parse it): INVALID_ARGUMENT, where
    grpc's own answer would be UNKNOWN."""
    key = gateway.create_key("grpc-bytes", "internal")
    # ChatRequest{messages: [Message{content: b"\xff\xfe"}]} written by hand.
    raw = b"\x0a\x04\x12\x02\xff\xfe"
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        call = ch.unary_stream(
            "/dsv2.v1.Chat/Chat", request_serializer=None, response_deserializer=None
        )(raw, metadata=_md(key))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [r async for r in call]
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in e.value.details()
        unary = ch.unary_unary(
            "/dsv2.v1.Chat/CreateSession", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unary(b"\x0a\x02\xc3\x28", metadata=_md(key))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_error_inside_a_stream_ends_with_a_status(gateway):
    """A generation failing mid-stream: the call ends UNAVAILABLE with the reason, never
    status OK with finish_reason="error"."""
    gateway.backend.fail_after = 2
    key = gateway.create_key("grpc-fail", "internal")
    got: list[cpb.ChatResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
            async for r in chat_pb2_grpc.ChatStub(ch).Chat(_hi(max_tokens=8), metadata=_md(key)):
                got.append(r)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "scripted failure" in e.value.details()
    assert [r.delta for r in got if r.delta] and not any(r.finish_reason for r in got)
    await asyncio.sleep(0)


# --- content parts with pictures: whatever they hold, a clear 4xx or an answer -------------


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 99, 199)).save(buf, format="PNG")
    return buf.getvalue()


_PNG = _png_bytes()
IMAGE_BYTES = st.sampled_from([_PNG, _PNG[: len(_PNG) // 2], _PNG[:30], b"", b"GIF89a"]) | (
    st.binary(max_size=48)
)
URLS = st.one_of(
    st.builds(lambda d: "data:image/png;base64," + base64.b64encode(d).decode(), IMAGE_BYTES),
    st.just("data:image/png;base64," + base64.b64encode(_PNG).decode()),
    st.builds(lambda d: "data:image/png;base64," + base64.b64encode(d).decode()[:-3], IMAGE_BYTES),
    st.builds(lambda t: "data:image/png;base64," + t, st.text(max_size=12)),
    st.sampled_from(
        [
            "data:text/plain;base64,aGVsbG8=",
            "data:image/png,raw",
            "data:,",
            "data:",
            "http://example.com/a.png",
            "https://127.0.0.1:1/a.png",  # allow-listed host, nothing listening
            "ftp://x/y.png",
            "file:///etc/passwd",
            "<image>",
        ]
    ),
    st.text(min_size=1, max_size=16),
)
IMAGE_PART = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})},
    optional={"detail": st.sampled_from(["auto", "high", "bogus"])},
)
TEXT_PART = st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=10) | st.just("<image>")}
)
JUNK_PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": JSON_VALUES}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "input_image", 3])}),
    JSON_VALUES,
)
PARTS = st.lists(IMAGE_PART | IMAGE_PART | TEXT_PART | JUNK_PART, min_size=1, max_size=6) | (
    st.lists(IMAGE_PART | TEXT_PART, max_size=6) | st.text(max_size=12)
)
PART_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "user", "system", "assistant"]), "content": PARTS}
    ),
    min_size=1,
    max_size=3,
)


@given(messages=PART_MESSAGES, turn=PARTS)
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_content_parts_never_a_server_error(vision_gateway, messages, turn):
    """Fuzzed content parts (good, broken and absurd pictures, URLs, types) on chat
    completions and on a session turn, against a model plane that reads pictures: never a
    5xx; a refusal names what to fix."""
    gw = vision_gateway
    key = gw.create_key("parts-fuzz", "internal")
    body = {"model": "dsv2-vl-scripted", "messages": messages, "max_tokens": 2}
    with httpx.Client(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        sid = c.post("/v1/sessions", json={}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": turn})
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        assert c.get(f"/v1/sessions/{sid}").status_code == 200
