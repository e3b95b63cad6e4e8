"""The VL2 conversation format and tokenization around images."""

from __future__ import annotations

import pytest
import torch

from model.image_layout import ImageLayout
from model.image_processing import ProcessedImage
from model.tokenizer import Tokenizer
from model.vl2_prompt import render_vl2_conversation, tokenize_with_images
from tests.support.vl2_checkpoints import IMAGE_TOKEN_ID, write_vl2_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_vl2_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def fake_image(num_tokens: int) -> ProcessedImage:
    return ProcessedImage(torch.zeros(2, 3, 1, 1), ImageLayout(1, 1), num_tokens, b"\0" * 16)


def test_render_matches_the_reference_format():
    messages = [
        {"role": "user", "content": "<image>\nWhat is this? "},
        {"role": "assistant", "content": " A cat."},
        {"role": "user", "content": "And its colour?"},
    ]
    assert render_vl2_conversation(messages) == (
        f"{BOS}<|User|>: <image>\nWhat is this?\n\n<|Assistant|>: A cat.{EOS}"
        "<|User|>: And its colour?\n\n<|Assistant|>:"
    )
    with_system = render_vl2_conversation(messages[:1], system_prompt="Be brief.")
    assert with_system == f"{BOS}Be brief.\n\n<|User|>: <image>\nWhat is this?\n\n<|Assistant|>:"
    # a leading system message is the system prompt
    assert (
        render_vl2_conversation([{"role": "system", "content": "Be brief."}, *messages[:1]])
        == with_system
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "assistant", "content": "<image>"}], "assistant"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "system"),
    ],
)
def test_render_refuses_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_vl2_conversation(messages)


def test_image_token_is_the_tokenizers_added_token(tokenizer):
    assert tokenizer.token_to_id("<image>") == IMAGE_TOKEN_ID
    assert tokenizer.encode("<image>") == [IMAGE_TOKEN_ID]


def test_each_image_expands_to_its_token_count(tokenizer):
    text = render_vl2_conversation(
        [{"role": "user", "content": "<image>\nCompare with <image> please"}]
    )
    images = [fake_image(7), fake_image(3)]
    ids, starts = tokenize_with_images(tokenizer, text, images, IMAGE_TOKEN_ID)
    pieces = text.split("<image>")
    want = (
        tokenizer.encode(pieces[0])
        + [IMAGE_TOKEN_ID] * 7
        + tokenizer.encode(pieces[1])
        + [IMAGE_TOKEN_ID] * 3
        + tokenizer.encode(pieces[2])
    )
    assert ids == want
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert starts == [len(tokenizer.encode(pieces[0])), want.index(IMAGE_TOKEN_ID, starts[0] + 7)]
    for start, image in zip(starts, images, strict=True):
        assert ids[start : start + image.num_tokens] == [IMAGE_TOKEN_ID] * image.num_tokens
    assert ids.count(IMAGE_TOKEN_ID) == 10
    assert tokenizer.decode(ids).endswith("please\n\n<|Assistant|>:")


def test_text_around_an_image_is_tokenized_piece_by_piece(tokenizer):
    # "Hello" and " world" on either side of an image: no merge crosses it
    ids, starts = tokenize_with_images(
        tokenizer, "Hello<image> world", [fake_image(2)], IMAGE_TOKEN_ID
    )
    assert ids == tokenizer.encode("Hello") + [IMAGE_TOKEN_ID] * 2 + tokenizer.encode(" world")
    assert starts == [len(tokenizer.encode("Hello"))]


@pytest.mark.parametrize(("text", "n"), [("<image><image>", 1), ("no picture", 1), ("<image>", 0)])
def test_placeholder_count_must_match(tokenizer, text, n):
    with pytest.raises(ValueError, match="placeholder"):
        tokenize_with_images(tokenizer, text, [fake_image(2)] * n, IMAGE_TOKEN_ID)
