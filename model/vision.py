"""The SigLIP vision tower of DeepSeek-VL2: a timm-style ViT without class token or pooling.

patch embedding (a stride-``patch`` convolution) + learned position embedding -> pre-norm
blocks (LayerNorm, multi-head attention with a qkv bias, LayerNorm, tanh-GELU MLP) -> final
LayerNorm (eps 1e-6). The output is every patch's vector; the attention-pooling head a
SigLIP checkpoint may carry is not used (checkpoints may hold it: it is not read).

Parameter names are timm's, so the published ``vision.*`` tensors map one to one:
``patch_embed.proj.{weight,bias}``, ``pos_embed`` [1, N, D],
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``,
``norm.{weight,bias}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ConfigError


@dataclass
class VisionConfig:
    """``vision_config`` of a DeepSeek-VL2 config.json (SigLIP-SO400M/14 at 384 px by
    default). The MLP width is ``intermediate_size`` when given, else int(width *
    mlp_ratio) (4304 for SO400M), as timm computes it."""

    model_name: str = "siglip_so400m_patch14_384"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    intermediate_size: int | None = None
    layer_norm_eps: float = 1e-6
    class_token: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"vision_config.{name} must be a positive integer, got {value!r}")
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"vision_config.patch_size ({self.patch_size}) exceeds image_size ({self.image_size})"
            )
        if self.width % self.heads:
            raise ConfigError(
                f"vision_config.width ({self.width}) must be a multiple of heads ({self.heads})"
            )
        if self.class_token:
            raise ConfigError("vision_config.class_token: true is not supported (VL2 has none)")
        if self.mlp_dim <= 0:
            raise ConfigError(f"vision_config gives an MLP width of {self.mlp_dim}")

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches along one side of a tile (27 for 384 / 14: the border remainder is cut)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["intermediate_size"] is None:
            del out["intermediate_size"]
        return out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.proj(pixels)  # [B, D, g, g]
        return x.flatten(2).transpose(1, 2)  # [B, g*g, D]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # [B, N, 3, H, Dh] -> 3 x [B, H, N, Dh]
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh], scale 1/sqrt(Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP: tanh GELU


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipVisionTower(nn.Module):
    """``tower(pixels [B, 3, S, S]) -> [B, g*g, width]`` (g = S // patch)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (timm-like): N(0, std) weights and position embedding, zero biases,
        unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.pos_embed.normal_(0.0, std, generator=generator)

    def forward(self, pixels: Tensor) -> Tensor:
        s = self.cfg.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"expected pixels [B, 3, {s}, {s}], got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels) + self.pos_embed  # [B, N, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
