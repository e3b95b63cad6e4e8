"""Tile choice and image token counts: the reference's selection rules, the layout formula
for every published candidate resolution, and agreement with the rows embed_images makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import DeepseekV2Config
from model.image_layout import (
    ImageLayout,
    image_token_count,
    layout_for,
    max_image_tokens,
    select_best_resolution,
    vl2_candidate_resolutions,
)
from model.image_processing import process_image
from model.projector import ProjectorConfig
from model.vision import VisionConfig
from model.vl2 import DeepseekVL2Config, DeepseekVL2ForCausalLM
from tests.support.checkpoints import TINY_CONFIG

S = 384
PUBLISHED = vl2_candidate_resolutions()


def formula(nw: int, nh: int) -> int:
    # h = ceil((384 // 14) / 2) = 14: 14 rows of (14 + newline), separator, local grid
    return 14 * 15 + 1 + (14 * nh) * (14 * nw + 1)


def test_published_candidates_are_the_23_pairs():
    pairs = {(m * S, n * S) for m in range(1, 10) for n in range(1, 10) if m * n <= 9}
    assert len(PUBLISHED) == 23 and set(PUBLISHED) == pairs
    assert PUBLISHED[:3] == [(384, 384), (384, 768), (768, 384)]


def test_known_counts_and_bound():
    assert formula(1, 1) == image_token_count(ImageLayout(1, 1), S, 14, 2) == 421
    assert image_token_count(ImageLayout(2, 2), S, 14, 2) == 1023
    assert image_token_count(ImageLayout(3, 3), S, 14, 2) == 2017
    # the tallest candidate (1 x 9 tiles) is the largest
    assert (
        max_image_tokens(PUBLISHED, S, 14, 2)
        == image_token_count(ImageLayout(1, 9), S, 14, 2)
        == 2101
    )


def test_selection_rules():
    # an image of exactly a candidate's size picks it
    assert select_best_resolution((768, 1152), PUBLISHED) == (768, 1152)
    # upscaling earns nothing: a small picture takes the least wasteful candidate
    assert select_best_resolution((100, 80), PUBLISHED) == (384, 384)
    # 800 x 600: (1152, 768) fits it at 1024 x 768 (capped at 480000, waste 404736);
    # (768, 768) and (768, 1152) give only 768 x 576; bigger ones waste more
    assert select_best_resolution((800, 600), PUBLISHED) == (1152, 768)
    # a full tie (same useful area, same waste) goes to the first candidate listed
    assert select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)
    assert select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)
    # fitted sizes are truncated, not rounded: 867 x 1300 fits (768, 1152) at 1151.56 ->
    # 1151 rows, so (1152, 1152), which fits it at 768 x 1152, wins (rounding would pick
    # (768, 1152): same useful area, less waste)
    assert select_best_resolution((867, 1300), PUBLISHED) == (1152, 1152)
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 10), PUBLISHED)


def test_without_cropping_every_image_has_one_local_tile():
    assert layout_for((3000, 400), PUBLISHED, S, cropping=False) == ImageLayout(1, 1)
    assert layout_for((3000, 400), PUBLISHED, S, cropping=True) == ImageLayout(8, 1)


@pytest.fixture(scope="module")
def tiny_vl2_at_384() -> DeepseekVL2ForCausalLM:
    """Published tile geometry (384 px, patch 14) with a tiny tower and language model."""
    torch.manual_seed(0)
    cfg = DeepseekVL2Config(
        language=DeepseekV2Config.from_dict(TINY_CONFIG),
        vision=VisionConfig(image_size=S, patch_size=14, width=8, layers=1, heads=1, mlp_ratio=1.0),
        projector=ProjectorConfig(input_dim=8, n_embed=TINY_CONFIG["hidden_size"]),
        candidate_resolutions=PUBLISHED,
    )
    return DeepseekVL2ForCausalLM(cfg).eval()


def test_every_candidate_token_count_is_the_formula_and_what_embed_images_makes(tiny_vl2_at_384):
    m = tiny_vl2_at_384
    rng = np.random.default_rng(0)
    for width, height in PUBLISHED:
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = process_image(picture, m.vl2_config.preprocess, cropping=True)
        nw, nh = width // S, height // S
        assert image.layout == ImageLayout(nw, nh), (width, height)
        assert image.tiles.shape == (1 + nw * nh, 3, S, S)
        assert image.num_tokens == formula(nw, nh)
        [rows] = m.embed_images([image])
        assert rows.shape == (formula(nw, nh), m.config.hidden_size), (width, height)
