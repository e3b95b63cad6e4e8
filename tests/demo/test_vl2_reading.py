"""The reading targets: each patch of the global view is labelled with what the picture shows
there (a digit's ink, a shape, a shape's centre), in the tile's own geometry; and the language
model's targets at a picture's image positions follow the 2D token layout."""

from __future__ import annotations

import random

import torch

from model.image_processing import process_image
from services.demo import pictures
from services.demo.vl2_reading import (
    IGNORE,
    MAX_CENTRES_PER_TOKEN,
    SHAPE_CENTRE,
    centre_counts,
    image_token_targets,
    patch_targets,
)
from services.demo.vl2_trainer import recipe_config, vl2_config

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


# stand-ins for the tokenizer's ids of "0".."9" (the targets only pick among them)
DIGIT_IDS = list(range(500, 510))
DIGIT_OF = {token: d for d, token in enumerate(DIGIT_IDS)}


def _views(targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's layout (one local tile): [4, 5] global rows (4 tokens + newline), the
    separator, [4, 5] local rows -> the two [4, 5] grids."""
    side = TILE // TOKEN
    grid = side * (side + 1)
    assert len(targets) == 2 * grid + 1
    assert targets[grid] == IGNORE  # the view separator
    as_grid = torch.tensor(targets).view(-1)
    return as_grid[:grid].view(side, side + 1), as_grid[grid + 1 :].view(side, side + 1)


def test_image_positions_say_each_digit_where_it_sits_in_both_views() -> None:
    config = vl2_config(recipe_config(), vocab_size=1024, image_token_id=3)
    rng = random.Random(4)
    for n in (5, 38, 70, 99):
        for _ in range(10):
            image, ink = pictures.number_picture_with_ink(rng, n, "train")
            processed = process_image(image, config.preprocess, cropping=True)
            targets = image_token_targets(ink, processed, config, DIGIT_IDS)
            assert len(targets) == processed.num_tokens
            global_view, local_view = _views(targets)
            assert torch.equal(global_view, local_view)
            assert (global_view[:, -1] == IGNORE).all()  # the newline closing each row
            said = global_view[global_view != IGNORE]
            assert {DIGIT_OF[t] for t in said.tolist()} == {int(c) for c in str(n)}
            if n >= 10 and n // 10 != n % 10:
                columns = torch.arange(TILE // TOKEN + 1).expand_as(global_view)
                tens, units = DIGIT_IDS[n // 10], DIGIT_IDS[n % 10]
                assert (
                    columns[global_view == tens].float().mean()
                    < columns[global_view == units].float().mean()
                )


def test_image_positions_of_a_shapes_picture_count_the_centres_they_hold() -> None:
    config = vl2_config(recipe_config(), vocab_size=1024, image_token_id=3)
    rng = random.Random(5)
    for i in range(50):
        count = i % pictures.MAX_SHAPES + 1
        image, ink = pictures.shapes_picture_with_ink(rng, count, "train")
        processed = process_image(image, config.preprocess, cropping=True)
        global_view, _ = _views(image_token_targets(ink, processed, config, DIGIT_IDS))
        tokens = global_view[:, :-1]  # every token says a count, 0 included
        assert sum(DIGIT_OF[t] for t in tokens.flatten().tolist()) == count
