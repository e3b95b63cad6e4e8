"""The demo tokenizer as the serving side loads it (model.tokenizer): digits one by one,
Chinese characters whole, any text round-trips, DeepSeek-VL2's specials and conversation
format, `<image>` one token."""

from __future__ import annotations

import random
from itertools import islice
from pathlib import Path

import pytest

from model.tokenizer import Tokenizer
from services.demo import vl2_corpus
from services.demo.build_tokenizer import IMAGE_TOKEN
from services.demo.trainer import IGNORE
from services.demo.vl2_trainer import VL2ChatEncoder

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_checkpoint)


def pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(text)]


def test_digits_are_split_one_by_one(tokenizer: Tokenizer) -> None:
    assert pieces(tokenizer, "12345") == ["1", "2", "3", "4", "5"]
    assert [p.strip() for p in pieces(tokenizer, "345 + 278 = 623")] == [
        *"345",
        "+",
        "",
        *"278",
        "=",
        "",
        *"623",
    ]


def test_chinese_characters_are_tokens_and_any_text_round_trips(tokenizer: Tokenizer) -> None:
    assert pieces(tokenizer, "你好加减乘") == ["你", "好", "加", "减", "乘"]
    rng = random.Random(0)
    for text in (
        "你好，世界！我是一个模型。",
        "龘靐齉 (rare characters) 😀 𝄞 naïve café",
        "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(200)),
    ):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_and_chat_template_follow_deepseek_vl2(tokenizer: Tokenizer) -> None:
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOS
    assert tokenizer.decode([tokenizer.bos_token_id]) == BOS
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        f"{BOS}Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>: Hello!{EOS}<|User|>: 2+2\n\n"
        "<|Assistant|>:"
    )
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert pieces(tokenizer, f"{IMAGE_TOKEN}\nWhat number?")[0] == IMAGE_TOKEN


def test_training_sees_what_serving_encodes_and_learns_only_the_replies(
    tokenizer: Tokenizer, demo_checkpoint: Path
) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    encoder = VL2ChatEncoder(HFTokenizer.from_file(str(demo_checkpoint / "tokenizer.json")))
    text_only = vl2_corpus.stream(5, vl2_corpus.Mix(picture_share=0.0))
    for sample in islice(text_only, 300):
        messages = sample.messages
        ids, labels = encoder.encode(messages)
        assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages, False))
        learned = [t for t in labels if t != IGNORE]
        replies = "".join(" " + m["content"] + EOS for m in messages if m["role"] == "assistant")
        assert tokenizer.decode(learned) == replies
