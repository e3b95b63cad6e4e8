"""DeepSeek-VL2 image preprocessing: a decoded RGB picture -> normalised tiles.

Global view: the whole image fitted (aspect kept, bicubic) and centred on an S x S canvas of
the mean colour. Local view: the image fitted and centred on the chosen candidate (W, H)
canvas, then cut into S x S tiles row by row. The canvas colour is the mean as integers,
``int(0.5 * 255) = 127`` (not 128), as the reference pads. Pixels go to [0, 1], then
``(x - mean) / std``. Pillow's ``ImageOps.pad`` does exactly the fit-and-centre step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from model.image_layout import (
    ImageLayout,
    Resolution,
    image_token_count,
    layout_for,
    max_image_tokens,
    vl2_candidate_resolutions,
)


@dataclass
class VisionPreprocessConfig:
    tile_size: int = 384  # S: the vision tower's input side
    patch_size: int = 14
    downsample_ratio: int = 2  # the projector folds ratio x ratio patches into one embedding
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    candidate_resolutions: list[Resolution] = field(default_factory=vl2_candidate_resolutions)

    def __post_init__(self) -> None:
        self.candidate_resolutions = [(int(w), int(h)) for w, h in self.candidate_resolutions]
        if not self.candidate_resolutions:
            raise ValueError("candidate_resolutions is empty")
        for w, h in self.candidate_resolutions:
            if w <= 0 or h <= 0 or w % self.tile_size or h % self.tile_size:
                raise ValueError(
                    f"candidate resolution {(w, h)} is not a positive multiple of the tile "
                    f"size {self.tile_size}"
                )

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """The padding colour: the mean as integers, truncated (127 for 0.5)."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    def token_count(self, layout: ImageLayout) -> int:
        return image_token_count(layout, self.tile_size, self.patch_size, self.downsample_ratio)

    @property
    def max_image_tokens(self) -> int:
        return max_image_tokens(
            self.candidate_resolutions, self.tile_size, self.patch_size, self.downsample_ratio
        )


@dataclass
class ProcessedImage:
    tiles: Tensor  # [1 + nw*nh, 3, S, S] float32 on the CPU: global view, then local tiles
    layout: ImageLayout
    num_tokens: int  # prompt positions this image takes
    content_hash: bytes  # blake2b-128 of the decoded RGB pixels + size


def content_hash(image: Image.Image) -> bytes:
    """Same picture -> same 16 bytes, whatever file it came from (hashes decoded pixels and
    the size, so two pictures whose pixel bytes coincide but shapes differ do not collide)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.blake2b(digest_size=16)
    h.update(b"RGB:%d:%d:" % rgb.size)
    h.update(rgb.tobytes())
    return h.digest()


def _to_tensor(image: Image.Image, mean: Tensor, std: Tensor) -> Tensor:
    """RGB image [H, W, 3] uint8 -> [3, H, W] float32, (x / 255 - mean) / std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # [3, H, W]
    return x.sub(mean).div(std)


def _normalisers(cfg: VisionPreprocessConfig) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device="cpu").view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device="cpu").view(3, 1, 1)
    return mean, std


def global_view(image: Image.Image, cfg: VisionPreprocessConfig) -> Tensor:
    """[3, S, S] the global view alone (what `process_image` puts first), for callers that
    need no local tiles (the demo's reading pre-stage)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    s = cfg.tile_size
    view = ImageOps.pad(rgb, (s, s), method=Image.Resampling.BICUBIC, color=cfg.fill_color)
    return _to_tensor(view, *_normalisers(cfg))


def process_image(
    image: Image.Image, cfg: VisionPreprocessConfig, cropping: bool
) -> ProcessedImage:
    """Tiles for one picture. ``cropping``: the conversation carries at most two images
    (otherwise every image gets a single local tile)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    s = cfg.tile_size
    layout = layout_for(rgb.size, cfg.candidate_resolutions, s, cropping)
    mean, std = _normalisers(cfg)
    fill = cfg.fill_color
    local_w, local_h = layout.nw * s, layout.nh * s
    local_view = ImageOps.pad(rgb, (local_w, local_h), method=Image.Resampling.BICUBIC, color=fill)
    local = _to_tensor(local_view, mean, std)  # [3, nh*S, nw*S]
    # [3, nh, S, nw, S] -> [nh, nw, 3, S, S]: tiles row by row
    local = local.view(3, layout.nh, s, layout.nw, s).permute(1, 3, 0, 2, 4)
    tiles = torch.cat([global_view(rgb, cfg).unsqueeze(0), local.reshape(-1, 3, s, s)])
    return ProcessedImage(
        tiles=tiles.contiguous(),
        layout=layout,
        num_tokens=cfg.token_count(layout),
        content_hash=content_hash(rgb),
    )
