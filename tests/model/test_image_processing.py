"""Preprocessing: global view + local tiles row by row, aspect-kept bicubic fit centred on a
mean-colour canvas (127 for a mean of 0.5), [0, 1] then (x - 0.5) / 0.5, and the content hash."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.image_layout import ImageLayout
from model.image_processing import VisionPreprocessConfig, content_hash, process_image

S = 70
CFG = VisionPreprocessConfig(
    tile_size=S,
    patch_size=14,
    candidate_resolutions=[(S * m, S * n) for m, n in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]],
)
PAD = (127 / 255 - 0.5) / 0.5  # the canvas colour after normalisation


def normalised(picture: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (a.float() / 255 - 0.5) / 0.5


def solid(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def test_fill_colour_is_127_for_mean_half():
    assert CFG.fill_color == (127, 127, 127)


def test_exact_tile_sized_picture_is_only_normalised():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
    image = process_image(picture, CFG, cropping=True)
    assert image.layout == ImageLayout(1, 1)
    assert image.tiles.dtype == torch.float32 and image.tiles.device.type == "cpu"
    assert image.tiles.shape == (2, 3, S, S)
    assert torch.equal(image.tiles[0], normalised(picture))
    assert torch.equal(image.tiles[1], normalised(picture))
    assert image.num_tokens == 3 * 4 + 1 + 3 * (3 + 1)  # h = ceil(5 / 2) = 3


def test_wide_picture_is_fitted_bicubic_and_centred_on_the_mean_colour():
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))  # 200 x 100
    image = process_image(picture, CFG, cropping=False)
    assert image.layout == ImageLayout(1, 1)
    # the global view: resized to 70 x 35 (aspect kept, bicubic), rows 18..52 (centred)
    canvas = solid(S, S, (127, 127, 127))
    canvas.paste(picture.resize((70, 35), Image.Resampling.BICUBIC), (0, 18))
    assert torch.equal(image.tiles[0], normalised(canvas))
    band = image.tiles[0, :, :18]
    assert torch.allclose(band, torch.full_like(band, PAD))  # top band is the canvas colour


def test_local_tiles_come_row_by_row():
    colors = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 255)}
    picture = solid(2 * S, 2 * S, (0, 0, 0))
    for (x, y), key in zip([(0, 0), (S, 0), (0, S), (S, S)], colors, strict=True):
        picture.paste(solid(S, S, colors[key]), (x, y))
    image = process_image(picture, CFG, cropping=True)
    assert image.layout == ImageLayout(2, 2)
    assert image.tiles.shape == (5, 3, S, S)
    for tile, key in zip(image.tiles[1:], colors, strict=True):
        want = torch.tensor(colors[key], dtype=torch.float32).view(3, 1, 1) / 255 * 2 - 1
        assert torch.equal(tile, want.expand(3, S, S)), key
    # a wide picture: its tiles side by side
    wide = solid(3 * S, S, (0, 0, 0))
    wide.paste(solid(S, S, (255, 255, 255)), (2 * S, 0))
    tiles = process_image(wide, CFG, cropping=True).tiles
    assert tiles.shape[0] == 4
    assert tiles[1].max() == -1 and tiles[3].min() == 1


def test_cropping_off_gives_two_tiles_whatever_the_size():
    image = process_image(solid(3 * S, S, (9, 9, 9)), CFG, cropping=False)
    assert image.layout == ImageLayout(1, 1) and image.tiles.shape[0] == 2


def test_non_rgb_pictures_are_converted():
    rgba = Image.new("RGBA", (S, S), (10, 20, 30, 255))
    image = process_image(rgba, CFG, cropping=True)
    assert torch.equal(image.tiles[0], normalised(rgba.convert("RGB")))
    assert image.content_hash == content_hash(rgba.convert("RGB"))


def test_content_hash_follows_the_pixels_not_the_file():
    rng = np.random.default_rng(2)
    picture = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    reread = Image.open(io.BytesIO(png.getvalue()))
    reread.load()
    digest = content_hash(picture)
    assert len(digest) == 16
    assert content_hash(reread) == digest == process_image(picture, CFG, True).content_hash
    changed = picture.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in picture.getpixel((0, 0))))
    assert content_hash(changed) != digest
    # same bytes, another shape: a different picture
    data = picture.tobytes()
    assert content_hash(Image.frombytes("RGB", (40, 30), data)) != digest


@pytest.mark.parametrize("bad", [[(S + 1, S)], []])
def test_candidates_must_be_multiples_of_the_tile(bad):
    with pytest.raises(ValueError, match="candidate"):
        VisionPreprocessConfig(tile_size=S, candidate_resolutions=bad)
