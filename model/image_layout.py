"""Dynamic tiling for DeepSeek-VL2 images: which tile grid an image gets and how many prompt
positions it takes.

Pure Python (no torch): the gateway imports it to bound and charge image tokens.

An image is shown to the model twice: a *global view* (the whole picture fitted into one
S x S tile) and a *local view* (the picture fitted into the candidate resolution (W, H) that
suits it best, cut into nw x nh tiles of S x S). Each tile becomes an h x h grid of
embeddings, h = ceil((S // patch) / downsample); the 2D layout adds one newline per row and
one separator between the views:

    global  h rows x (h + 1)           (h embeddings + image_newline)
    sep     1                          (view_seperator)
    local   (h * nh) rows x (h * nw + 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Resolution = tuple[int, int]  # (width, height) in pixels


def vl2_candidate_resolutions(tile_size: int = 384, max_tiles: int = 9) -> list[Resolution]:
    """The candidate (W, H) list DeepSeek-VL2 publishes for ``tile_size`` 384: every
    (m * S, n * S) with m * n <= max_tiles, by tile count, then the most elongated first,
    the tall one before the wide one (23 pairs for 9 tiles)."""
    out: list[Resolution] = []
    for tiles in range(1, max_tiles + 1):
        for a in range(1, math.isqrt(tiles) + 1):
            if tiles % a:
                continue
            b = tiles // a
            out.append((a * tile_size, b * tile_size))
            if a != b:
                out.append((b * tile_size, a * tile_size))
    return out


def select_best_resolution(size: Resolution, candidates: Sequence[Resolution]) -> Resolution:
    """The candidate (W, H) an image of ``size`` (width, height) is tiled to, by the
    reference's rules: fit the image inside each candidate keeping its aspect ratio (sizes
    truncated); its useful area is capped at the original area (upscaling earns nothing);
    the largest useful area wins, ties go to the least wasted area, then to the earlier
    candidate."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if not candidates:
        raise ValueError("no candidate resolutions")
    best: Resolution | None = None
    best_useful, best_waste = -1, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        fitted = int(width * scale) * int(height * scale)
        useful = min(fitted, width * height)
        waste = cw * ch - useful
        if useful > best_useful or (useful == best_useful and waste < best_waste):
            best, best_useful, best_waste = (int(cw), int(ch)), useful, waste
    assert best is not None
    return best


@dataclass(frozen=True)
class ImageLayout:
    nw: int  # local tiles across
    nh: int  # local tiles down

    @property
    def num_local_tiles(self) -> int:
        return self.nw * self.nh

    @property
    def num_tiles(self) -> int:
        """Tiles the vision tower sees: the global view plus the local ones."""
        return 1 + self.nw * self.nh


def layout_for(
    size: Resolution, candidates: Sequence[Resolution], tile_size: int, cropping: bool
) -> ImageLayout:
    """The tile grid of an image of ``size``; without cropping (a conversation with more
    than two images) every image gets one local tile."""
    if not cropping:
        return ImageLayout(1, 1)
    width, height = select_best_resolution(size, candidates)
    return ImageLayout(width // tile_size, height // tile_size)


def tokens_per_tile_side(tile_size: int, patch_size: int, downsample: int) -> int:
    """h: embeddings along one side of a tile after the projector's downsampling."""
    return math.ceil((tile_size // patch_size) / downsample)


def image_token_count(layout: ImageLayout, tile_size: int, patch_size: int, downsample: int) -> int:
    """Prompt positions one image takes: h*(h+1) + 1 + (h*nh)*(h*nw + 1)."""
    h = tokens_per_tile_side(tile_size, patch_size, downsample)
    return h * (h + 1) + 1 + (h * layout.nh) * (h * layout.nw + 1)


def max_image_tokens(
    candidates: Iterable[Resolution], tile_size: int, patch_size: int, downsample: int
) -> int:
    """The most positions any one image can take (what a request must be able to reserve)."""
    layouts = [ImageLayout(1, 1)]  # without cropping
    layouts += [ImageLayout(w // tile_size, h // tile_size) for w, h in candidates]
    return max(image_token_count(lay, tile_size, patch_size, downsample) for lay in layouts)
