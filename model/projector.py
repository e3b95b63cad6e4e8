"""DeepSeek-VL2's ``downsample_mlp_gelu`` projector: vision patches -> language embeddings.

The g x g patch grid of a tile is padded with zeros at the bottom and right to a multiple of
``downsample_ratio`` r, each r x r block is folded into one vector **channel-major** (the r*r
positions of channel 0, then of channel 1, ...: what ``F.unfold`` produces), then
Linear(C*r*r -> n_embed*mlp_ratio) -> GELU -> ... -> Linear(-> n_embed). GELU here is the
exact (erf) one. Names as published: ``layers.{0,2,...}.{weight,bias}`` (an nn.Sequential
with the GELUs at the odd indices).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ConfigError

SUPPORTED_PROJECTORS = ("downsample_mlp_gelu",)


@dataclass
class ProjectorConfig:
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152  # the vision width
    n_embed: int = 2048  # the language model's hidden size
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def __post_init__(self) -> None:
        if self.projector_type not in SUPPORTED_PROJECTORS:
            raise ConfigError(
                f"projector_config.projector_type={self.projector_type!r} is not supported; "
                f"use one of {SUPPORTED_PROJECTORS}"
            )
        if self.token_pooling:
            raise ConfigError("projector_config.token_pooling: true is not supported")
        for name in ("input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"projector_config.{name} must be a positive integer, got {value!r}"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fold_patches(x: Tensor, ratio: int) -> Tensor:
    """[B, g*g, C] patch grid -> [B, (G/r)^2, C*r*r], G = g rounded up to a multiple of r
    (zero rows/columns added at the bottom and right); channel-major within each block."""
    b, n, c = x.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    pad = -g % ratio
    grid = x.view(b, g, g, c)
    if pad:
        grid = F.pad(grid, (0, 0, 0, pad, 0, pad))  # [B, G, G, C], zeros bottom/right
    side = (g + pad) // ratio
    # [B, side, r, side, r, C] -> [B, side, side, C, r, r]: channel outer, block position inner
    blocks = grid.view(b, side, ratio, side, ratio, c).permute(0, 1, 3, 5, 2, 4)
    return blocks.reshape(b, side * side, c * ratio * ratio)


class DownsampleMlpProjector(nn.Module):
    """``projector(patches [B, g*g, C]) -> [B, h*h, n_embed]``, h = ceil(g / ratio)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        r, hidden = cfg.downsample_ratio, cfg.n_embed * cfg.mlp_ratio
        mods: list[nn.Module] = [nn.Linear(cfg.input_dim * r * r, hidden)]
        # the reference always ends GELU -> Linear(-> n_embed): depth 1 builds what 2 does
        for _ in range(1, cfg.depth - 1):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        mods += [nn.GELU(), nn.Linear(hidden, cfg.n_embed)]
        self.layers = nn.Sequential(*mods)

    def forward(self, patches: Tensor) -> Tensor:
        return self.layers(fold_patches(patches, self.cfg.downsample_ratio))
