"""Input caps and checks shared by HTTP and gRPC: one place decides what a request may hold.

Both APIs call these functions after their own type checks (pydantic on HTTP, protobuf on
gRPC) and before quota admission, so a refused request costs nothing and names the field to
fix. Sizes are counted in UTF-8 bytes: that is what the tokenizer reads, and with a byte-level
BPE tokenizer a byte is at most one token, which makes the byte count a cheap upper bound of
the prompt's tokens (`prompt_token_bound`) to charge before any tokenization.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from services.gateway.core.errors import InvalidInput

ROLES = ("system", "user", "assistant")

# A chat completion body is at most ~5 levels deep (body > messages > message > content part
# > text); anything far deeper is an attack on the parser, refused before it recurses.
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class Limits:
    """The caps (Settings: DSV2_MAX_*); see README "Input limits"."""

    max_messages: int = 256
    max_message_bytes: int = 128_000
    max_request_bytes: int = 256_000  # all messages' content together
    max_stop: int = 4
    max_stop_bytes: int = 256
    max_system_prompt_bytes: int = 32_000  # a stored session's system prompt
    max_title_chars: int = 200
    # Upper bound of the tokens the chat template adds around each message and once per
    # prompt (role labels, separators, bos/eos); DeepSeek-V2's template adds under 25.
    template_tokens_per_message: int = 32
    template_tokens_fixed: int = 32
    # Pictures (core/images.py): each one's encoded size and pixel count (read from its
    # header before anything is decoded), how many one message and one request may carry,
    # and their encoded bytes together in one request.
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 16_000_000
    max_images_per_message: int = 4
    max_images_per_request: int = 8
    max_image_request_bytes: int = 16 * 2**20

    @property
    def body_bytes_for_images(self) -> int:
        """What the images of one request may add to an HTTP body or gRPC message: base64
        (4 bytes per 3) plus a data-URL header and JSON around each."""
        if self.max_images_per_request <= 0:
            return 0
        return -(-self.max_image_request_bytes // 3) * 4 + 1024 * self.max_images_per_request


class _Message(Protocol):
    role: str
    content: str


def utf8_size(value: str, param: str) -> int:
    """The UTF-8 byte length of a text field; 400 for text no UTF-8 can carry (a lone
    surrogate, e.g. a "\\ud800" escape) and for NUL characters, which no prompt or title
    needs and which C-string consumers downstream would cut at."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidInput(
            f"{param} holds a character UTF-8 cannot encode (a lone surrogate at index "
            f"{e.start}); send valid Unicode text.",
            param=param,
            code="invalid_text",
        ) from None
    if "\x00" in value:
        raise InvalidInput(
            f"{param} contains a NUL character; remove it.", param=param, code="invalid_text"
        )
    return size


def check_messages(messages: Sequence[_Message], limits: Limits) -> int:
    """Roles, count and sizes of a conversation; returns its content's total UTF-8 bytes."""
    if not messages:
        raise InvalidInput("messages must contain at least one message.", param="messages")
    if len(messages) > limits.max_messages:
        raise InvalidInput(
            f"Too many messages ({len(messages)}); at most {limits.max_messages}.",
            param="messages",
        )
    total = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidInput(
                f"messages[{i}].role is {m.role!r}; expected one of {', '.join(ROLES)}.",
                param=f"messages.{i}.role",
            )
        size = utf8_size(m.content, f"messages.{i}.content")
        if size > limits.max_message_bytes:
            raise InvalidInput(
                f"messages[{i}].content is {size} bytes (UTF-8); at most "
                f"{limits.max_message_bytes} per message.",
                param=f"messages.{i}.content",
                code="message_too_large",
            )
        total += size
        if total > limits.max_request_bytes:
            raise InvalidInput(
                f"The messages hold more than {limits.max_request_bytes} bytes (UTF-8) "
                "together, the limit per request; shorten them.",
                param="messages",
                code="request_too_large",
            )
    if messages[-1].role == "assistant":
        raise InvalidInput(
            "The last message must be from the user (or system), not the assistant.",
            param="messages",
        )
    return total


def check_sampling(
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    stop: Sequence[str],
    limits: Limits,
) -> None:
    """Sampling parameters as the engine accepts them; NaN and infinities included."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInput("max_tokens must be at least 1.", param="max_tokens")
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise InvalidInput(
            f"temperature is {temperature}; it must be between 0 and 2.", param="temperature"
        )
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        raise InvalidInput(f"top_p is {top_p}; it must be between 0 and 1.", param="top_p")
    if len(stop) > limits.max_stop:
        raise InvalidInput(
            f"stop holds {len(stop)} sequences; at most {limits.max_stop}.", param="stop"
        )
    for i, s in enumerate(stop):
        size = utf8_size(s, f"stop.{i}")
        if not 1 <= size <= limits.max_stop_bytes:
            raise InvalidInput(
                f"stop[{i}] is {size} bytes; each stop sequence must be 1 to "
                f"{limits.max_stop_bytes} bytes (UTF-8).",
                param=f"stop.{i}",
            )


def check_turn_content(content: str, limits: Limits, *, num_images: int = 0) -> int:
    """A user message sent to a stored session; returns its UTF-8 bytes. With pictures the
    text may be empty (the content then holds only their <image> markers)."""
    size = utf8_size(content, "content")
    if not num_images and not content.strip():
        raise InvalidInput("content must not be empty.", param="content")
    if size > limits.max_message_bytes:
        raise InvalidInput(
            f"content is {size} bytes (UTF-8); at most {limits.max_message_bytes}.",
            param="content",
            code="message_too_large",
        )
    return size


def check_session_fields(title: str, system_prompt: str, limits: Limits) -> None:
    """A new session's title and system prompt (what one identity may store is capped by the
    session store; this caps each field)."""
    utf8_size(title, "title")
    if len(title) > limits.max_title_chars:
        raise InvalidInput(
            f"title is {len(title)} characters; at most {limits.max_title_chars}.",
            param="title",
        )
    size = utf8_size(system_prompt, "system_prompt")
    if size > limits.max_system_prompt_bytes:
        raise InvalidInput(
            f"system_prompt is {size} bytes (UTF-8); at most {limits.max_system_prompt_bytes}.",
            param="system_prompt",
        )


def prompt_token_bound(content_bytes: int, num_messages: int, limits: Limits) -> int:
    """An upper bound of the prompt's tokens without tokenizing: a byte-level BPE turns each
    byte into at most one token, plus the chat template's own tokens."""
    return (
        content_bytes
        + num_messages * limits.template_tokens_per_message
        + limits.template_tokens_fixed
    )


def prompt_token_floor(content_bytes: int, max_token_bytes: int) -> int:
    """A lower bound of the prompt's tokens: no token stands for more than max_token_bytes
    (reported by the model plane; 0 = unknown, no bound)."""
    return -(-content_bytes // max_token_bytes) if max_token_bytes > 0 else 0


# --- JSON bodies ------------------------------------------------------------------------------


def _depth_exceeds(data: object, limit: int) -> bool:
    """Whether containers nest deeper than `limit` (iterative: no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r} in an object")
    return out


def parse_json(raw: bytes) -> object:
    """The one JSON reader of request bodies, for the fast lane and FastAPI's routes alike.
    Strict: valid UTF-8 without lone surrogates, no NaN/Infinity, numbers within a double's
    range, at most MAX_JSON_DEPTH levels, no duplicate keys (which copy wins is not something
    a client should have to guess). Raises json.JSONDecodeError, which both paths turn into
    the same 400."""
    try:
        data = orjson.loads(raw)  # C, depth-limited: never a RecursionError
    except orjson.JSONDecodeError as e:  # a json.JSONDecodeError
        raise json.JSONDecodeError(e.msg, "", 0) from None
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", 0)
    if raw.count(b":") > 1:
        # orjson keeps the last of duplicate keys silently; the stdlib parser, whose hook
        # sees every pair, tells. Safe to recurse now: the depth is bounded above.
        try:
            json.loads(raw, object_pairs_hook=_no_duplicates)
        except ValueError as e:
            raise json.JSONDecodeError(str(e), "", 0) from None
    return data
