"""Streamed text: never half a UTF-8 character, stop strings cut (and never leak) output."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.detokenizer import IncrementalDetokenizer
from model.tokenizer import Tokenizer
from services.engine import Engine, SamplingParams
from services.engine.text import TextStream

CHINESE = "中文文本必须正确地流式输出，不能出现半个字符。北京是中国的首都。"


@pytest.fixture(scope="module")
def tokenizer(engine_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(engine_checkpoint)


def stream(tokenizer: Tokenizer, text: str, stop: list[str]) -> tuple[list[str], bool, TextStream]:
    ts = TextStream(IncrementalDetokenizer(tokenizer), stop)
    pieces = []
    for t in tokenizer.encode(text):
        piece, stopped = ts.push(t)
        pieces.append(piece)
        if stopped:
            return pieces, True, ts
    pieces.append(ts.finish())
    return pieces, False, ts


def test_chinese_streams_whole_characters_only(tokenizer):
    ids = tokenizer.encode(CHINESE)
    assert len(ids) > len(CHINESE) // 2  # characters really are split across tokens
    pieces, stopped, _ = stream(tokenizer, CHINESE, [])
    assert not stopped and "".join(pieces) == CHINESE
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_output_and_is_never_emitted(tokenizer):
    text = "Hello, world! How are you today?"
    pieces, stopped, ts = stream(tokenizer, text, ["How are"])
    assert stopped
    assert "".join(pieces) == "Hello, world! "
    assert ts.text == "Hello, world! "


def test_stop_string_spanning_tokens_and_held_back_prefix(tokenizer):
    # "wor" is a prefix of the stop string: held back until it cannot be one any more
    pieces, stopped, _ = stream(tokenizer, "The quick brown fox", ["brownie"])
    assert not stopped and "".join(pieces) == "The quick brown fox"
    pieces, stopped, _ = stream(tokenizer, CHINESE, ["北京"])
    assert stopped and "".join(pieces) == CHINESE[: CHINESE.index("北京")]


def test_engine_stops_on_stop_ids_and_reports_length(engine_checkpoint):
    engine = Engine.from_pretrained(engine_checkpoint)
    free = engine.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = engine.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True),
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert engine.metrics.cache_blocks_used == 0
