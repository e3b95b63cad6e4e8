"""Whole-model logits with images against an oracle of independent parts (transformers'
SiglipVisionModel, the projector and the 2D layout written from their definitions in
tests/model/vl2_oracle.py, transformers' DeepseekV2ForCausalLM with inputs_embeds):
max |difference| <= 1e-4 in float32 on small random configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import model
from model.image_processing import process_image
from model.vl2_prompt import render_vl2_conversation, tokenize_with_images
from tests.model.vl2_oracle import VL2Oracle
from tests.support.vl2_checkpoints import IMAGE_TOKEN_ID, TINY_TILE, write_random_vl2_checkpoint


def noise_picture(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB picture (smooth blobs plus noise, so resizing keeps structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(
        np.clip(np.asarray(base, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    )


def prompt_with_images(m, tokenizer, pictures: list[Image.Image]):
    """Tokens of a two-turn conversation showing ``pictures``, and their ProcessedImages."""
    cropping = len(pictures) <= 2
    images = [process_image(p, m.vl2_config.preprocess, cropping) for p in pictures]
    tags = "".join("<image>\n" for _ in pictures)
    text = render_vl2_conversation(
        [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi! How are you?"},
            {"role": "user", "content": f"{tags}What is in the picture?"},
        ],
        system_prompt="You are a helpful assistant.",
    )
    ids, starts = tokenize_with_images(tokenizer, text, images, IMAGE_TOKEN_ID)
    return ids, starts, images


def ours_logits(m, ids: list[int], starts: list[int], images) -> torch.Tensor:
    embeds = m.embed_tokens(torch.tensor(ids))  # [T, D]
    for start, rows in zip(starts, m.embed_images(images), strict=True):
        embeds[start : start + rows.shape[0]] = rows
    with torch.no_grad():
        return m(inputs_embeds=embeds.unsqueeze(0))[0]


def check_against_oracle(checkpoint, language_cls, workdir, pictures) -> None:
    """The must-show comparison for one VL2 checkpoint: reusable by any language model."""
    from model.tokenizer import Tokenizer

    m = model.load_pretrained(checkpoint)
    assert isinstance(m, model.DeepseekVL2ForCausalLM)
    assert m.vl2_config.image_token_id == IMAGE_TOKEN_ID  # found in the tokenizer.json
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids, starts, images = prompt_with_images(m, tokenizer, pictures)
    oracle = VL2Oracle(checkpoint, language_cls, workdir)
    got = ours_logits(m, ids, starts, images)
    want = oracle.logits(ids, images, starts)
    assert got.shape == want.shape == (len(ids), m.config.vocab_size)
    assert (got - want).abs().max().item() <= 1e-4
    # the pictures matter: logits after them differ from the same prompt without images
    text_only = ours_logits(m, [i if i != IMAGE_TOKEN_ID else 5 for i in ids], [], [])
    last = starts[-1] + images[-1].num_tokens
    assert (text_only[last:] - got[last:]).abs().max().item() > 1e-2
    assert want.std().item() > 0.1


LANGUAGE_CASES = {
    # VL2-Small's language model is DeepSeek-V2-Lite's: greedy routing, no q compression
    "v2_lite_like": dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None),
    # the test default: group-limited routing, q compression, YaRN, a dense first layer
    "tiny_default": {},
}


@pytest.mark.parametrize("case", list(LANGUAGE_CASES))
def test_logits_with_two_cropped_images_match_oracle(tmp_path, case):
    from transformers import DeepseekV2ForCausalLM

    ckpt = write_random_vl2_checkpoint(tmp_path / "ckpt", seed=5, **LANGUAGE_CASES[case])
    pictures = [  # a wide one (2 x 1 local tiles) and a tall one (1 x 3)
        noise_picture(2 * TINY_TILE + 9, TINY_TILE - 3, seed=1),
        noise_picture(TINY_TILE - 20, 3 * TINY_TILE - 31, seed=2),
    ]
    check_against_oracle(ckpt, DeepseekV2ForCausalLM, tmp_path / "oracle", pictures)


def test_logits_with_three_images_no_cropping_match_oracle(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    ckpt = write_random_vl2_checkpoint(tmp_path / "ckpt", seed=6, **LANGUAGE_CASES["v2_lite_like"])
    pictures = [noise_picture(150 + 40 * i, 90 + 17 * i, seed=10 + i) for i in range(3)]
    check_against_oracle(ckpt, DeepseekV2ForCausalLM, tmp_path / "oracle", pictures)
