"""Synthetic pictures: a shapes picture shows exactly `count` separate shapes, numbers are drawn
large in every font of their split, the seed fixes every pixel, and what evaluation holds out
(fonts, hues, layouts) never appears in training pictures."""

from __future__ import annotations

import colorsys
import random
from collections import deque

import numpy as np
import pytest

from services.demo import pictures


def blobs(image) -> int:
    """Connected regions (8-neighbour: polygon edges touch diagonally) that differ from the background (the corner pixel)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    background = rgb[0, 0]
    mask = np.abs(rgb - background).sum(-1) > 40
    seen = np.zeros_like(mask)
    h, w = mask.shape
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + dy, cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_shapes_pictures_show_exactly_count_separate_shapes(split: str) -> None:
    rng = random.Random(11)
    for _ in range(40):
        count = rng.randint(1, pictures.MAX_SHAPES)
        assert blobs(pictures.shapes_picture(rng, count, split)) == count


def test_pictures_are_fixed_by_the_seed() -> None:
    def draw(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        return [
            pictures.shapes_picture(rng, 3, "train").tobytes(),
            pictures.number_picture(rng, 42, "train").tobytes(),
            pictures.text_picture(rng, "12 + 7", "train").tobytes(),
        ]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_every_training_font_draws_every_number_large() -> None:
    rng = random.Random(0)
    for font in pictures.TRAIN_FONTS:
        for n in (0, 7, 42, 99):
            image = pictures.number_picture(rng, n, "train", font=font)
            ink = blobs(image)
            assert 1 <= ink <= 4, (font, n, ink)  # one blob per digit, give or take a stroke


def test_held_out_fonts_are_installed_free_families_training_never_uses() -> None:
    fonts = pictures.held_out_fonts()
    assert fonts, "no held-out font installed (fonts-dejavu-core / fonts-liberation)"
    assert not set(fonts) & set(pictures.TRAIN_FONTS)
    rng = random.Random(1)
    for font in fonts:
        assert blobs(pictures.number_picture(rng, 58, "held_out", font=font)) >= 1


def test_colour_hues_and_layouts_are_split() -> None:
    rng = random.Random(3)
    for split, parity in (("train", 0), ("held_out", 1)):
        for _ in range(300):
            hue = pictures._hue(rng, split)
            assert int(hue * 360 // 30) % 2 == parity
    _, fills = pictures.colours(rng, "held_out", 5)
    for colour in fills:
        h, s, _ = colorsys.rgb_to_hsv(*(c / 255 for c in colour))
        assert int(h * 360 // 30) % 2 == 1 or s < 0.05
    with pytest.raises(ValueError):
        pictures.shapes_picture(rng, 6, "train")
    with pytest.raises(ValueError):
        pictures.number_picture(rng, 100, "train")
