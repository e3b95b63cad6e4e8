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


def test_held_out_fonts_are_families_training_never_uses() -> None:
    fonts = pictures.held_out_fonts()
    assert "pillow-aileron" in fonts and len(fonts) >= 2, fonts  # Pillow's own + a free family
    assert not set(fonts) & set(pictures.train_fonts())
    assert not any(name.startswith("DejaVu") for name in fonts), fonts
    rng = random.Random(1)
    for font in fonts:
        assert 1 <= blobs(pictures.number_picture(rng, 58, "held_out", font=font)) <= 4, font


def test_training_refuses_to_draw_without_its_fonts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training pictures must be the same on every machine: a missing training font is an
    error naming the package to install, not a silently smaller font set."""
    monkeypatch.setattr(pictures, "TRAIN_FONT_FILES", ("NoSuchFont-Regular.ttf",))
    pictures.train_fonts.cache_clear()
    try:
        with pytest.raises(pictures.MissingFontError, match="fonts-dejavu-core"):
            pictures.number_picture(random.Random(0), 5, "train")
    finally:
        pictures.train_fonts.cache_clear()


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


def _background(rgb: np.ndarray) -> np.ndarray:
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()]


def test_ink_maps_mark_each_digit_where_it_is_drawn() -> None:
    """The reading pre-stage's per-patch targets come from these maps: each digit's ink carries
    that digit, left to right, and lies where the picture shows ink."""
    rng = random.Random(4)
    for font in pictures.train_fonts():
        for n in (7, 42, 90):
            image, ink = pictures.number_picture_with_ink(rng, n, "train", font=font)
            labels = np.asarray(ink.labels)
            assert labels.shape == (image.height, image.width)
            inked = labels != pictures.INK_BACKGROUND
            assert sorted(set(labels[inked].tolist())) == sorted({int(c) for c in str(n)})
            rgb = np.asarray(image, dtype=np.int32)
            differs = np.abs(rgb - _background(rgb)).sum(-1) > 30
            assert (inked & ~differs).sum() <= 0.02 * inked.sum(), (font, n)
            if n >= 10:  # the tens digit's ink lies left of the units digit's
                columns = np.nonzero(inked)[1]
                tens = columns[labels[inked] == n // 10].mean()
                units = columns[labels[inked] == n % 10].mean()
                assert tens < units, (font, n)


def test_ink_maps_of_shapes_cover_them_and_know_their_centres() -> None:
    rng = random.Random(5)
    for count in range(1, pictures.MAX_SHAPES + 1):
        image, ink = pictures.shapes_picture_with_ink(rng, count, "train")
        labels = np.asarray(ink.labels)
        assert len(ink.centres) == count
        for cx, cy in ink.centres:
            assert labels[int(cy), int(cx)] == pictures.INK_SHAPE
        rgb = np.asarray(image, dtype=np.int32)
        differs = np.abs(rgb - _background(rgb)).sum(-1) > 30
        assert (differs == (labels == pictures.INK_SHAPE)).mean() > 0.99
