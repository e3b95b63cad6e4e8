"""The reading pre-stage: the vision tower and projector learn to see before the language model
reads them.

A tiny ViT trained from scratch only through the language model's next-token loss learns too
slowly here: after ~1300 picture steps its embeddings of a "3" and an "8" on the same background
were 0.9999 cosine-similar and every number got the same answer. This stage gives it a direct
signal instead: a throw-away linear classifier over the projector's whole token grid (so where a
digit sits, tens or units, is kept) reads the shape count (1-5), the tens digit (none or 0-9)
and the units digit of each picture, with cross-entropy. Only the global view goes through the
tower (for the square tiles of this model the local tile shows the same picture). The
classifier is not part of the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn

from model.image_processing import ProcessedImage, global_view
from model.vl2 import DeepseekVL2Config, DeepseekVL2ForCausalLM
from services.demo import pictures

COUNT_CLASSES = pictures.MAX_SHAPES  # 1..5 -> 0..4
TENS_CLASSES = 11  # 0: no tens digit (a single-digit number), 1..10: tens digit 0..9
UNITS_CLASSES = 10
IGNORE = -100
# Per-patch classes: the ink classes of `pictures.Ink` (0-9 digits, background, shape, other)
# and the patch where a shape's centre lies, so counting has a place to look for each shape.
SHAPE_CENTRE = pictures.INK_OTHER + 1
PATCH_CLASSES = SHAPE_CENTRE + 1
# A patch is labelled with its ink when at least this share of its pixels is ink.
PATCH_INK_SHARE = 1 / 8
# How many shapes' centres a projector token holds: 0, 1, 2, 3 or more (five shapes in a row
# on a 64 px tile put two in one 16 px token, and a model that only learns "a centre is here"
# then counts one short).
MAX_CENTRES_PER_TOKEN = 3


class ReadingHead(nn.Module):
    """[N, h*h, D] projector tokens -> logits for count, tens and units. The tokens are pooled
    by their mean and by attention with three learned queries (one per answer), so a digit is
    read wherever it sits (a classifier over the flattened grid would have to learn every digit
    at every position separately); the position embeddings the tokens carry tell tens from
    units."""

    def __init__(self, tokens: int, dim: int, patch_dim: int, device: torch.device) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, device=device)
        self.queries = nn.Parameter(torch.randn(3, dim, device=device) * dim**-0.5)
        self.out = nn.Linear(4 * dim, COUNT_CLASSES + TENS_CLASSES + UNITS_CLASSES, device=device)
        # what each of the tower's patches shows (dense targets: a picture teaches 64 things
        # at once instead of 1-2, which gets a ViT from scratch off its plateau far sooner)
        self.patches = nn.Linear(patch_dim, PATCH_CLASSES, device=device)
        # ... and what each projector token (a 2 x 2 block of patches) shows: the tokens the
        # language model reads then each say which digit or shape they hold
        self.regions = nn.Linear(dim, PATCH_CLASSES, device=device)
        # ... and how many shapes' centres each projector token holds
        self.centres = nn.Linear(dim, MAX_CENTRES_PER_TOKEN + 1, device=device)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.norm(tokens)  # [N, T, D]
        weights = torch.einsum("qd,ntd->nqt", self.queries, x).softmax(-1)  # [N, 3, T]
        pooled = torch.einsum("nqt,ntd->nqd", weights, x)  # [N, 3, D]
        features = torch.cat([x.mean(1, keepdim=True), pooled], dim=1).flatten(1)  # [N, 4D]
        logits = self.out(features)  # [N, 26]
        return logits.split((COUNT_CLASSES, TENS_CLASSES, UNITS_CLASSES), dim=-1)


@dataclass
class ReadingBatch:
    pixels: Tensor  # [N, 3, S, S] global views
    count: Tensor  # [N] class or IGNORE
    tens: Tensor  # [N]
    units: Tensor  # [N]
    patches: Tensor  # [N, P] what each patch of the global view shows (PATCH_CLASSES)
    regions: Tensor  # [N, h*h] what each projector token's 2 x 2 patches show
    centres: Tensor  # [N, h*h] how many shapes' centres each projector token holds (capped)


def patch_targets(ink: pictures.Ink, tile: int, patch: int) -> Tensor:
    """[P] the class of each patch of the global view: the picture's ink map fitted and padded
    as `process_image` fits the picture, then per patch its most common ink class where enough
    of it is ink (else background); a shape's centre marks its patch."""
    fitted, left, top = _fitted_labels(ink, tile)
    canvas = Image.new("L", (tile, tile), pictures.INK_BACKGROUND)
    canvas.paste(fitted, (left, top))
    grid = tile // patch
    pixels = np.asarray(canvas, dtype=np.int64)  # [S, S]
    cells = pixels.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    # [P, C] how many pixels of each class every patch holds (one bincount over patch x class)
    cell_of = np.arange(grid * grid)[:, None] * PATCH_CLASSES
    ink_counts = np.bincount((cells + cell_of).ravel(), minlength=grid * grid * PATCH_CLASSES)
    ink_counts = ink_counts.reshape(grid * grid, PATCH_CLASSES)
    ink_counts[:, pictures.INK_BACKGROUND] = 0
    has_ink = ink_counts.sum(1) >= PATCH_INK_SHARE * patch * patch
    classes = np.where(has_ink, ink_counts.argmax(1), pictures.INK_BACKGROUND)
    classes[_centre_cells(ink, fitted.size, (left, top), tile, patch)] = SHAPE_CENTRE
    return torch.from_numpy(classes)


def centre_counts(ink: pictures.Ink, tile: int, patch: int) -> Tensor:
    """[P] how many shapes' centres each patch holds, capped at MAX_CENTRES_PER_TOKEN."""
    fitted, left, top = _fitted_labels(ink, tile)
    cells = _centre_cells(ink, fitted.size, (left, top), tile, patch)
    counts = np.bincount(np.asarray(cells, dtype=np.int64), minlength=(tile // patch) ** 2)
    return torch.from_numpy(np.minimum(counts, MAX_CENTRES_PER_TOKEN))


def _fitted_labels(ink: pictures.Ink, tile: int) -> tuple[Image.Image, int, int]:
    """The ink map fitted into the tile, and its offset there, as `ImageOps.pad` (and so
    `process_image`) fits and centres the picture."""
    fitted = ImageOps.contain(ink.labels, (tile, tile), Image.Resampling.NEAREST)
    return fitted, round((tile - fitted.width) * 0.5), round((tile - fitted.height) * 0.5)


def _centre_cells(
    ink: pictures.Ink, fitted: tuple[int, int], offset: tuple[int, int], tile: int, patch: int
) -> list[int]:
    """The patch index of each shape's centre in the picture fitted to `fitted` at `offset`."""
    (w, h), grid = ink.labels.size, tile // patch
    cells = []
    for cx, cy in ink.centres:
        col = min(grid - 1, int((cx * fitted[0] / w + offset[0]) // patch))
        row = min(grid - 1, int((cy * fitted[1] / h + offset[1]) // patch))
        cells.append(row * grid + col)
    return cells


def reading_targets(kind: str, value: int) -> tuple[int, int, int]:
    if kind == "count":
        return value - 1, IGNORE, IGNORE
    return IGNORE, (0 if value < 10 else value // 10 + 1), value % 10


def reading_batches(
    config: DeepseekVL2Config,
    seed: int,
    batch_size: int,
    *,
    split: str = "train",
    count_share: float = 0.4,
    single_digit_share: float = 0.3,
    easy_share: float = 0.0,
) -> Iterator[ReadingBatch]:
    """Endless batches of shapes and number pictures (a share of them single glyphs, a share
    drawn the easy way: dark on white, large, centred)."""
    rng = random.Random(seed)
    pre = config.preprocess
    patch, downsample = config.vision.patch_size, config.projector.downsample_ratio
    while True:
        tiles, targets, patches, regions, centres = [], [], [], [], []
        for _ in range(batch_size):
            easy = rng.random() < easy_share
            if rng.random() < count_share:
                kind, value = "count", rng.randint(1, pictures.MAX_SHAPES)
                image, ink = pictures.shapes_picture_with_ink(rng, value, split, easy=easy)  # type: ignore[arg-type]
            else:
                kind = "number"
                single = rng.random() < single_digit_share
                value = rng.randint(0, 9) if single else rng.randint(0, 99)
                image, ink = pictures.number_picture_with_ink(rng, value, split, easy=easy)  # type: ignore[arg-type]
            tiles.append(global_view(image, pre))
            targets.append(reading_targets(kind, value))
            patches.append(patch_targets(ink, pre.tile_size, patch))
            regions.append(patch_targets(ink, pre.tile_size, patch * downsample))
            centres.append(centre_counts(ink, pre.tile_size, patch * downsample))
        t = torch.tensor(targets, dtype=torch.long, device="cpu")
        yield ReadingBatch(
            torch.stack(tiles),
            t[:, 0],
            t[:, 1],
            t[:, 2],
            torch.stack(patches),
            torch.stack(regions),
            torch.stack(centres),
        )


def reading_loss(
    model: DeepseekVL2ForCausalLM, head: ReadingHead, batch: ReadingBatch, device: torch.device
) -> tuple[Tensor, dict[str, float]]:
    features = model.vision(batch.pixels.to(device))  # [N, P, W]
    tokens = model.projector(features)  # [N, h*h, D]
    count, tens, units = head(tokens)
    losses, accuracy = [], {}
    for name, logits, target in (
        ("patches", head.patches(features), batch.patches),  # [N, P, PATCH_CLASSES]
        ("regions", head.regions(tokens), batch.regions),  # [N, h*h, PATCH_CLASSES]
        ("centres", head.centres(tokens), batch.centres),  # [N, h*h, MAX_CENTRES + 1]
    ):
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.to(device).flatten()))
        accuracy[name] = (logits.argmax(-1).cpu() == target).float().mean().item()
    for name, logits, target in (
        ("count", count, batch.count),
        ("tens", tens, batch.tens),
        ("units", units, batch.units),
    ):
        target = target.to(device)
        if (target != IGNORE).any():
            losses.append(F.cross_entropy(logits, target, ignore_index=IGNORE))
            keep = target != IGNORE
            accuracy[name] = (logits[keep].argmax(-1) == target[keep]).float().mean().item()
    return torch.stack(losses).sum(), accuracy


@torch.no_grad()
def reading_accuracy(
    model: DeepseekVL2ForCausalLM,
    head: ReadingHead,
    config: DeepseekVL2Config,
    device: torch.device,
    *,
    split: str,
    pictures_per_kind: int = 200,
    seed: int = 99,
) -> dict[str, float]:
    """How often the classifier gets a picture's count, or its whole number, right."""
    counts = next(reading_batches(config, seed, pictures_per_kind, split=split, count_share=1.0))
    numbers = next(
        reading_batches(config, seed + 1, pictures_per_kind, split=split, count_share=0.0)
    )
    c, _, _ = head(model.projector(model.vision(counts.pixels.to(device))))
    _, t, u = head(model.projector(model.vision(numbers.pixels.to(device))))
    number_right = (t.argmax(-1).cpu() == numbers.tens) & (u.argmax(-1).cpu() == numbers.units)
    return {
        "count": (c.argmax(-1).cpu() == counts.count).float().mean().item(),
        "number": number_right.float().mean().item(),
    }


def image_token_targets(
    ink: pictures.Ink, image: ProcessedImage, config: DeepseekVL2Config, digit_ids: list[int]
) -> list[int]:
    """[num_tokens] what the language model is taught to say at each of a picture's image
    positions: on a number picture the token of the digit that projector token's 2 x 2 patches
    show (IGNORE where they show none); on a shapes picture how many shapes' centres it holds
    ("0" to "3"); IGNORE at the layout's newlines and separator. A dense signal beside the
    answer's few tokens: the language model learns what each token shows where it sits, and
    the answer then reads those in order (a number) or adds them up (a count).
    The local view gets the same targets as the global one (both are the whole picture fitted
    to one tile); a picture cut into several local tiles gets none there."""
    pre, h = config.preprocess, config.tokens_per_tile_side
    token_px = config.vision.patch_size * config.projector.downsample_ratio
    if ink.centres:
        per_token = [digit_ids[c] for c in centre_counts(ink, pre.tile_size, token_px).tolist()]
    else:
        classes = patch_targets(ink, pre.tile_size, token_px).tolist()
        per_token = [digit_ids[c] if c < 10 else IGNORE for c in classes]
    # h rows of h tokens, each row closed by the newline
    view = [t for r in range(h) for t in (*per_token[r * h : (r + 1) * h], IGNORE)]
    layout = image.layout
    one_tile = layout.nw == layout.nh == 1
    local = view if one_tile else [IGNORE] * (layout.nh * h * (layout.nw * h + 1))
    targets = [*view, IGNORE, *local]
    if len(targets) != image.num_tokens:
        raise ValueError(f"{len(targets)} targets for {image.num_tokens} image positions")
    return targets
