"""Tiny random DeepSeek-VL2 checkpoints for tests anywhere, built from transformers' parts.

``wrap_as_vl2(text_dir, out_dir, ...)`` turns a text checkpoint (a DeepSeek-V2/V3 one written
by transformers: ``write_random_checkpoint`` or a test's own) into a DeepSeek-VL2 checkpoint:
config.json in the published layout (``model_type: deepseek_vl_v2``, the text config as
``language_config``), its tensors under ``language.``, a random SigLIP tower drawn by
transformers' ``SiglipVisionModel`` stored under timm's names (``vision.*``), a random
``downsample_mlp_gelu`` projector (``projector.layers.{0,2}``), ``image_newline`` and
``view_seperator``, and a tokenizer with ``<image>`` as an added special token.
``write_random_vl2_checkpoint(path, **language_overrides)`` does both steps for DeepSeek-V2.

``siglip_to_timm`` / ``timm_to_siglip`` map the vision tensor names between the two schemes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.support.checkpoints import TOKENIZER_VOCAB, _tokenizer_json, write_random_checkpoint

IMAGE_TOKEN = "<image>"
# ids: the test tokenizer's 512 entries, then "<image>"; the language vocabulary covers it
VL2_VOCAB = TOKENIZER_VOCAB + 8
IMAGE_TOKEN_ID = TOKENIZER_VOCAB

# small, but with the shapes that matter: a 5 x 5 patch grid (odd: the projector pads it)
TINY_VISION: dict[str, Any] = {
    "model_name": "siglip_so400m_patch14_384",
    "image_size": 70,
    "patch_size": 14,
    "width": 24,
    "layers": 2,
    "heads": 2,
    "mlp_ratio": 2.5,  # int(24 * 2.5) = 60
}
TINY_TILE = TINY_VISION["image_size"]
# (m * S, n * S), m * n <= 4, in the published order
TINY_CANDIDATES = [
    [TINY_TILE * m, TINY_TILE * n]
    for m, n in [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2)]
]


def siglip_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' SiglipVisionModel tensors -> timm ViT names (q, k, v fused into qkv)."""
    s = {re.sub(r"^vision_model\.", "", k): v for k, v in state.items()}
    out = {
        "patch_embed.proj.weight": s["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": s["embeddings.patch_embedding.bias"],
        "pos_embed": s["embeddings.position_embedding.weight"].unsqueeze(0),
        "norm.weight": s["post_layernorm.weight"],
        "norm.bias": s["post_layernorm.bias"],
    }
    layers = {int(m.group(1)) for k in s if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for a, b in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")]:  # fmt: skip
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = s[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat(
                [s[f"{src}self_attn.{x}_proj.{p}"] for x in ("q", "k", "v")]
            )
    return out


def timm_to_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT names -> transformers' SiglipVisionModel names (qkv split into q, k, v)."""
    out = {
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
        "embeddings.position_embedding.weight": state["pos_embed"][0],
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        for a, b in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")]:  # fmt: skip
            for p in ("weight", "bias"):
                out[f"{dst}{a}.{p}"] = state[f"{src}{b}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{p}"].chunk(3)
            out[f"{dst}self_attn.q_proj.{p}"] = q
            out[f"{dst}self_attn.k_proj.{p}"] = k
            out[f"{dst}self_attn.v_proj.{p}"] = v
    return out


def siglip_config(vision: dict[str, Any]):
    """transformers' SiglipVisionConfig for a VL2 ``vision_config`` (tanh GELU, eps 1e-6,
    no pooling head)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=vision["width"],
        intermediate_size=vision.get("intermediate_size")
        or int(vision["width"] * vision["mlp_ratio"]),
        num_hidden_layers=vision["layers"],
        num_attention_heads=vision["heads"],
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def random_siglip(vision: dict[str, Any], seed: int):
    """A SiglipVisionModel with every tensor random (norms around 1, biases nonzero), so a
    misplaced bias or norm shows."""
    from transformers import SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(siglip_config(vision)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


def write_vl2_tokenizer(path: str | Path) -> int:
    """The test tokenizer plus ``<image>`` as an added special token; returns its id."""
    from tokenizers import AddedToken, Tokenizer

    from tests.support.checkpoints import write_tokenizer

    write_tokenizer(path)  # tokenizer_config.json (bos/eos, template) and tokenizer.json
    tok = Tokenizer.from_str(_tokenizer_json())
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    (Path(path) / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    token_id = tok.token_to_id(IMAGE_TOKEN)
    assert token_id == IMAGE_TOKEN_ID
    return token_id


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
    else:
        files = {"model.safetensors"}
    out: dict[str, torch.Tensor] = {}
    for f in sorted(files):
        out.update(load_file(str(directory / f)))
    return out


def wrap_as_vl2(
    text_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    vision: dict[str, Any] | None = None,
    candidate_resolutions: list[list[int]] | None = None,
    projector_overrides: dict[str, Any] | None = None,
) -> Path:
    """A DeepSeek-VL2 checkpoint at ``out_dir`` whose language model is the text checkpoint
    at ``text_dir`` (tensors copied under ``language.``), with a random vision side."""
    text_dir, out = Path(text_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vision = dict(vision or TINY_VISION)
    language = json.loads((text_dir / "config.json").read_text(encoding="utf-8"))
    hidden = language["hidden_size"]
    projector = {
        "projector_type": "downsample_mlp_gelu",
        "input_dim": vision["width"],
        "n_embed": hidden,
        "depth": 2,
        "mlp_ratio": 1,
        "downsample_ratio": 2,
        **(projector_overrides or {}),
    }
    dtype = language.get("torch_dtype", "float32")
    config = {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "language_config": language,
        "vision_config": vision,
        "projector_config": projector,
        "candidate_resolutions": candidate_resolutions or TINY_CANDIDATES,
        "tile_tag": "2D",
        "global_view_pos": "head",
        "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tensors = {f"language.{k}": v for k, v in _read_tensors(text_dir).items()}
    siglip = random_siglip(vision, seed)
    tensors.update({f"vision.{k}": v for k, v in siglip_to_timm(siglip.state_dict()).items()})
    g = torch.Generator().manual_seed(seed + 7)
    r = projector["downsample_ratio"]
    width = projector["n_embed"] * projector["mlp_ratio"]
    shapes = {
        "projector.layers.0.weight": (width, projector["input_dim"] * r * r),
        "projector.layers.0.bias": (width,),
        "projector.layers.2.weight": (projector["n_embed"], width),
        "projector.layers.2.bias": (projector["n_embed"],),
        "image_newline": (hidden,),
        "view_seperator": (hidden,),
    }
    for name, shape in shapes.items():
        scale = shape[1] ** -0.5 if len(shape) == 2 else 0.5
        tensors[name] = torch.randn(shape, generator=g) * scale
    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_vl2_tokenizer(out)
    return out


def write_random_vl2_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vision: dict[str, Any] | None = None,
    candidate_resolutions: list[list[int]] | None = None,
    **language_overrides: Any,
) -> Path:
    """A tiny random DeepSeek-VL2 checkpoint with a DeepSeek-V2 language model (the test
    TINY_CONFIG plus ``language_overrides``, vocabulary VL2_VOCAB). The text checkpoint it
    wraps stays at ``path/language`` (the oracle loads it with transformers)."""
    path = Path(path)
    text = write_random_checkpoint(
        path / "language",
        seed=seed,
        dtype=dtype,
        **{"vocab_size": VL2_VOCAB, **language_overrides},
    )
    return wrap_as_vl2(
        text,
        path / "vl2",
        seed=seed,
        vision=vision,
        candidate_resolutions=candidate_resolutions,
    )
