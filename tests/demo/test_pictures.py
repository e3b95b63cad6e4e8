"""Synthetic pictures: a shapes picture shows `count` shapes (separate, but where training packs
corners together), numbers are drawn large in every font of their split, the seed fixes every
pixel, and what evaluation holds out (fonts, hues, layouts) never appears in training
pictures."""

from __future__ import annotations

import colorsys
import math
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


def test_held_out_shapes_pictures_show_exactly_count_separate_shapes() -> None:
    rng = random.Random(11)
    for _ in range(40):
        count = rng.randint(1, pictures.MAX_SHAPES)
        assert blobs(pictures.shapes_picture(rng, count, "held_out")) == count


def test_training_shapes_are_separate_but_where_packed_corners_touch() -> None:
    """Training packs shapes close, so a few pictures show two of them touching (never more
    blobs than shapes, never shapes missing: the count is still what is drawn)."""
    rng = random.Random(11)
    exact = 0
    for _ in range(200):
        count = rng.randint(1, pictures.MAX_SHAPES)
        found = blobs(pictures.shapes_picture(rng, count, "train"))
        assert 1 <= found <= count
        exact += found == count
    assert exact >= 0.93 * 200


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


def test_training_packs_shapes_close_often_of_one_size() -> None:
    """Training scatters shapes closer than 1.45 of their sizes (the old rule; a held-out row of
    five is that tight), never closer than 1.15, often all of one size, inside the picture."""
    rng = random.Random(6)
    tight = same_size = 0
    for _ in range(300):
        placed = pictures._scatter(rng, 192, 160, [rng.uniform(3, 14) for _ in range(5)])
        if placed is None:
            continue
        centres, radii = placed
        for i, (c, r) in enumerate(zip(centres, radii, strict=True)):
            assert 1.4 * r <= c[0] <= 192 - 1.4 * r and 1.4 * r <= c[1] <= 160 - 1.4 * r
            for d, q in zip(centres[:i], radii, strict=False):
                assert math.dist(c, d) > 1.15 * (r + q)
                tight += math.dist(c, d) < 1.45 * (r + q)
        same_size += max(radii) <= 1.4 * min(radii)
    assert tight > 20  # none under the old rule
    assert same_size > 100


def test_training_grids_vary_and_never_form_one_row() -> None:
    rng = random.Random(7)
    shapes = set()
    for _ in range(200):
        centres = pictures._grid(rng, 4, 180, 120)
        assert len(centres) == 4
        assert len({round(y) for _, y in centres}) > 1  # never one row
        shapes.add(len({round(x / 180 * 12) for x, _ in centres}))
    assert len(shapes) > 2
