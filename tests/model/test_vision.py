"""The SigLIP vision tower against transformers' SiglipVisionModel (random weights, float32,
weights mapped from its names to timm's), and the projector's 2 x 2 fold against F.unfold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ConfigError
from model.projector import DownsampleMlpProjector, ProjectorConfig, fold_patches
from model.vision import SiglipVisionTower, VisionConfig
from tests.support.vl2_checkpoints import random_siglip, siglip_to_timm

CASES = {
    # a 5 x 5 patch grid, MLP width from mlp_ratio
    "odd_grid": dict(image_size=70, patch_size=14, width=24, layers=2, heads=2, mlp_ratio=2.5),
    # SO400M's tile geometry (384 / 14: 27 x 27 patches, 6 border pixels cut), explicit width
    "so400m_geometry": dict(
        image_size=384, patch_size=14, width=32, layers=1, heads=4, intermediate_size=48
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tower_matches_transformers_siglip(case):
    vision = {"mlp_ratio": 1.0, **CASES[case]}
    oracle = random_siglip(vision, seed=3)
    tower = SiglipVisionTower(VisionConfig(**vision)).eval()
    tower.load_state_dict(siglip_to_timm(oracle.state_dict()), strict=True)
    s = vision["image_size"]
    pixels = torch.rand(3, 3, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got = tower(pixels)
        want = oracle(pixel_values=pixels).last_hidden_state
    grid = s // vision["patch_size"]
    assert got.shape == want.shape == (3, grid * grid, vision["width"])
    assert (got - want).abs().max().item() <= 1e-4
    assert want.std().item() > 0.1


def test_published_so400m_shapes():
    """The published vision_config: MLP width int(1152 * 3.7362) = 4304, 27 x 27 patches,
    and one tile -> 14 x 14 = 196 embeddings of the language width (shapes on meta)."""
    cfg = VisionConfig()
    assert (cfg.mlp_dim, cfg.grid) == (4304, 27)
    with torch.device("meta"):
        tower = SiglipVisionTower(cfg)
        proj = DownsampleMlpProjector(ProjectorConfig(input_dim=1152, n_embed=2048))
        out = proj(tower(torch.empty(2, 3, 384, 384)))
    assert tuple(out.shape) == (2, 196, 2048)
    assert tuple(tower.blocks[0].mlp.fc1.weight.shape) == (4304, 1152)
    assert tuple(proj.layers[0].weight.shape) == (2048, 1152 * 4)


@pytest.mark.parametrize("grid", [4, 5, 27])
def test_fold_is_unfold_channel_major_with_zero_padding(grid):
    c = 3
    x = torch.randn(2, grid * grid, c, generator=torch.Generator().manual_seed(grid))
    pad = grid % 2
    padded = F.pad(x.view(2, grid, grid, c), (0, 0, 0, pad, 0, pad)).permute(0, 3, 1, 2)
    want = F.unfold(padded, kernel_size=2, stride=2).transpose(1, 2)
    got = fold_patches(x, 2)
    side = (grid + 1) // 2
    assert got.shape == (2, side * side, 4 * c)
    assert torch.equal(got, want)
    # channel-major: the first 4 values of a block are channel 0 at its 4 positions
    g = x.view(2, grid, grid, c)
    assert torch.equal(
        got[0, 0, :4], torch.stack([g[0, 0, 0, 0], g[0, 0, 1, 0], g[0, 1, 0, 0], g[0, 1, 1, 0]])
    )


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        (dict(width=30, heads=4), "heads"),
        (dict(patch_size=0), "patch_size"),
        (dict(class_token=True), "class_token"),
    ],
)
def test_bad_vision_config_names_the_field(fields, names):
    with pytest.raises(ConfigError, match=names):
        VisionConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        (dict(projector_type="mlp_gelu"), "projector_type"),
        (dict(downsample_ratio=0), "downsample_ratio"),
        (dict(token_pooling=True), "token_pooling"),
    ],
)
def test_bad_projector_config_names_the_field(fields, names):
    with pytest.raises(ConfigError, match=names):
        ProjectorConfig(**fields)
