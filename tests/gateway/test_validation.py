"""validation.py: the caps both APIs share, the strict JSON reader, and the byte bounds of a
prompt's tokens checked against the real demo tokenizer (a byte-level BPE, like
DeepSeek-V2's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.tokenizer import Tokenizer
from services.gateway.core.errors import InvalidInput
from services.gateway.core.validation import (
    MAX_JSON_DEPTH,
    Limits,
    check_messages,
    check_sampling,
    check_session_fields,
    check_turn_content,
    parse_json,
    prompt_token_bound,
    prompt_token_floor,
)
from services.rpc.dsv2.v1 import inference_pb2 as pb

DEMO = Path(__file__).resolve().parents[2] / "services" / "demo" / "checkpoint"
LIMITS = Limits(max_messages=4, max_message_bytes=100, max_request_bytes=150, max_stop_bytes=8)


def msg(role: str, content: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=content)


def refused(fn, *args, **kw) -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        fn(*args, **kw)
    return e.value


def test_message_caps_count_utf8_bytes_and_name_the_field():
    assert check_messages([msg("user", "héllo")], LIMITS) == 6  # é is 2 bytes
    assert refused(check_messages, [], LIMITS).param == "messages"
    assert refused(check_messages, [msg("user", "a")] * 5, LIMITS).param == "messages"
    e = refused(check_messages, [msg("tool", "a")], LIMITS)
    assert e.param == "messages.0.role" and "tool" in e.message
    # 34 Chinese characters are 102 bytes: over the 100-byte message cap though 34 chars.
    e = refused(check_messages, [msg("user", "ok"), msg("user", "中" * 34)], LIMITS)
    assert e.param == "messages.1.content" and e.code == "message_too_large"
    e = refused(check_messages, [msg("user", "a" * 90), msg("user", "b" * 90)], LIMITS)
    assert e.param == "messages" and e.code == "request_too_large"
    assert refused(check_messages, [msg("assistant", "a")], LIMITS).param == "messages"


def test_text_no_utf8_can_carry_and_nul_are_refused():
    e = refused(check_messages, [msg("user", "ok"), msg("user", "a\x00b")], LIMITS)
    assert e.param == "messages.1.content" and "NUL" in e.message
    e = refused(check_turn_content, "bad \ud800 surrogate", LIMITS)
    assert e.param == "content" and "surrogate" in e.message
    assert refused(check_session_fields, "t\x00", "", LIMITS).param == "title"
    assert refused(check_session_fields, "t" * 201, "", LIMITS).param == "title"
    e = refused(check_session_fields, "t", "y" * (LIMITS.max_system_prompt_bytes + 1), LIMITS)
    assert e.param == "system_prompt"
    assert refused(check_turn_content, "   ", LIMITS).param == "content"


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"top_p": -1.0}, "top_p"),
        ({"top_p": 50.0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": float("inf")}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop.0"),
        ({"stop": ["ok", "x" * 9]}, "stop.1"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"stop": ["\ud800"]}, "stop.0"),
    ],
)
def test_sampling_refusals_name_the_field(kw, param):
    args = {"max_tokens": None, "temperature": 1.0, "top_p": 1.0, "stop": [], **kw}
    assert refused(check_sampling, limits=LIMITS, **args).param == param


def test_sampling_accepts_the_edges():
    check_sampling(max_tokens=1, temperature=0.0, top_p=0.0, stop=["12345678"], limits=LIMITS)
    check_sampling(max_tokens=None, temperature=2.0, top_p=1.0, stop=["a"] * 4, limits=LIMITS)


@pytest.mark.parametrize(
    "raw,why",
    [
        (b'{"a": "\xff"}', "UTF-8"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b'{"a": "\xed\xa0\x80"}', "surrogates"),
        (b"[" * 100_000 + b"]" * 100_000, "depth"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "deeper"),
        (b'{"a": 1e400}', "infinity"),
        (b'{"a": ' + b"9" * 5000 + b"}", "infinity"),
        (b'{"a": NaN}', ""),
        (b'{"a": 1, "b": {"c": 1, "c": 2}}', "duplicate key 'c'"),
        (b'{"a": "x\x00y"}', "control character"),
    ],
)
def test_parse_json_refuses_what_no_client_should_send(raw, why):
    with pytest.raises(json.JSONDecodeError) as e:
        parse_json(raw)
    assert why in e.value.msg


def test_parse_json_accepts_ordinary_documents():
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(nested) is not None
    assert parse_json('{"a": "中\\u0000", "b": [1, 2.5, null]}'.encode()) == {
        "a": "中\x00",
        "b": [1, 2.5, None],
    }


# --- the byte bounds against the real tokenizer ---------------------------------------------

# Any UTF-8 text, with pieces that tokenize unusually: CJK (split per character by the
# pre-tokenizer), digits (one token each), emoji, special tokens and template text.
PIECE = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(["中文", "😀", " ", "\n\n", "1234", "<｜end▁of▁sentence｜>", "User: "]),
)
TEXT = st.lists(PIECE, max_size=6).map("".join)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO)


@given(
    contents=st.lists(TEXT, min_size=1, max_size=4),
    roles=st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=4, max_size=4),
)
@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
def test_byte_bounds_hold_for_the_real_tokenizer(tokenizer, contents, roles):
    """floor <= tokens of the rendered chat prompt <= bound: what the gateway reserves before
    tokenizing covers the real count, and what it refuses from bytes alone is really too long."""
    messages = [{"role": roles[i], "content": c} for i, c in enumerate(contents)]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = len(tokenizer.encode(text))
    size = sum(len(c.encode()) for c in contents)
    assert tokens <= prompt_token_bound(size, len(contents), Limits())
    assert prompt_token_floor(size, tokenizer.max_token_bytes) <= tokens
