"""The reading pre-stage's targets: each patch of the global view is labelled with what the
picture shows there (a digit's ink, a shape, a shape's centre), in the tile's own geometry."""

from __future__ import annotations

import random

import torch

from services.demo import pictures
from services.demo.vl2_reading import (
    MAX_CENTRES_PER_TOKEN,
    SHAPE_CENTRE,
    centre_counts,
    patch_targets,
)

TILE, PATCH = 64, 8
GRID = TILE // PATCH
TOKEN = 2 * PATCH  # a projector token folds 2 x 2 patches


def test_number_patches_carry_their_digits_tens_left_of_units() -> None:
    rng = random.Random(0)
    for n in (3, 47, 80, 99):
        for _ in range(10):
            _, ink = pictures.number_picture_with_ink(rng, n, "train")
            classes = patch_targets(ink, TILE, PATCH)  # [P]
            assert classes.shape == (GRID * GRID,)
            shown = set(classes.tolist()) - {pictures.INK_BACKGROUND}
            assert shown == {int(c) for c in str(n)}, (n, shown)
            if n >= 10 and n // 10 != n % 10:
                columns = torch.arange(GRID * GRID) % GRID
                assert (
                    columns[classes == n // 10].float().mean()
                    < columns[classes == n % 10].float().mean()
                )


def test_each_shape_marks_one_centre_patch_inside_its_ink() -> None:
    rng = random.Random(1)
    exact = 0
    for i in range(100):
        count = i % pictures.MAX_SHAPES + 1
        _, ink = pictures.shapes_picture_with_ink(rng, count, "train")
        classes = patch_targets(ink, TILE, PATCH)
        centres = int((classes == SHAPE_CENTRE).sum())
        assert 1 <= centres <= count
        exact += centres == count
        assert set(classes.tolist()) <= {pictures.INK_BACKGROUND, pictures.INK_SHAPE, SHAPE_CENTRE}
    assert exact >= 95  # two centres share a patch only when small shapes sit close together


def test_targets_follow_the_picture_into_the_padded_tile() -> None:
    """A wide picture is fitted to the tile's width and padded above and below, as
    process_image pads it: the padding rows are background."""
    rng = random.Random(2)
    for _ in range(20):
        image, ink = pictures.number_picture_with_ink(rng, 8, "train")
        classes = patch_targets(ink, TILE, PATCH).view(GRID, GRID)
        w, h = image.size
        pad_rows = round(TILE * (1 - min(1.0, h / w)) / 2) // PATCH
        if pad_rows:
            assert (classes[:pad_rows] == pictures.INK_BACKGROUND).all()
            assert (classes[-pad_rows:] == pictures.INK_BACKGROUND).all()


def test_each_projector_token_counts_the_shape_centres_it_holds() -> None:
    """Five small shapes in a row (a held-out layout) put two centres in one 16 px token: the
    token's target says two, so counting the tokens' centres gives five, not four."""
    rng = random.Random(3)
    shared = 0
    for split in ("train", "held_out"):
        for i in range(100):
            count = i % pictures.MAX_SHAPES + 1
            _, ink = pictures.shapes_picture_with_ink(rng, count, split)  # type: ignore[arg-type]
            per_token = centre_counts(ink, TILE, TOKEN)
            assert per_token.shape == ((TILE // TOKEN) ** 2,)
            assert int(per_token.sum()) == count
            assert int(per_token.max()) <= MAX_CENTRES_PER_TOKEN
            # the patch-level centre marks lie in the tokens that count them
            marks = (patch_targets(ink, TILE, PATCH) == SHAPE_CENTRE).view(GRID, GRID)
            tokens = marks.view(TILE // TOKEN, 2, TILE // TOKEN, 2).any(3).any(1).flatten()
            assert torch.equal(tokens, per_token > 0)
            shared += int(per_token.max()) >= 2
    assert shared > 0
