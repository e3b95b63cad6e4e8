"""Tokenizer, DeepSeek-V2-Chat template and UTF-8-safe incremental detokenization."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from model.detokenizer import IncrementalDetokenizer
from model.tokenizer import ChatTemplateError, Tokenizer

CHINESE = "深度求索发布了一个混合专家语言模型，中文文本必须正确地流式输出。🙂 café"


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint)


def test_special_tokens_and_round_trip(tok):
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.vocab_size == 512
    for text in ["Hello, world!", CHINESE, "def f(x):\n    return x\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, add_special_tokens=True) == [0, *ids]


def test_chat_template_is_deepseek_v2_chat(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "你好"},
    ]
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    prompt = tok.apply_chat_template(messages)
    assert prompt == (
        f"{bos}You are helpful.\n\nUser: Hi\n\nAssistant: Hello!{eos}User: 你好\n\nAssistant:"
    )
    ids = tok.encode(prompt)
    assert ids[0] == 0 and ids.count(1) == 1  # bos/eos in the text map to their ids
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Assistant:")
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"content": "no role"}])


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_incremental_detokenizer_never_emits_half_a_character(tok):
    ids = tok.encode(CHINESE)
    pieces = stream(tok, ids)
    assert "".join(pieces) == CHINESE
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens ended mid-character and were held back


def test_single_byte_tokens(tok):
    # Feed "中" (e4 b8 ad) and "🙂" (4 bytes) as one byte-level token per byte.
    vocab = tok._tok.get_vocab()
    byte_level = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    ids = [vocab[byte_level[b]] for b in "中🙂".encode()]
    pieces = stream(tok, ids)
    assert pieces == ["", "", "中", "", "", "", "🙂", ""]


def test_flush_emits_incomplete_tail(tok):
    vocab = tok._tok.get_vocab()
    byte_level = dict(zip(range(256), _bytes_to_unicode(), strict=True))
    ids = [vocab[byte_level[b]] for b in "a中".encode()[:-1]]
    pieces = stream(tok, ids)
    assert pieces[:-1] == ["a", "", ""] and pieces[-1] == "\ufffd"


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable-character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def test_tokenizer_imports_no_torch():
    code = "import sys, model.tokenizer, model.detokenizer; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip() == "False"
