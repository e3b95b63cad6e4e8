"""Small random DeepSeek-VL2 checkpoints, pictures and the plain full-forward oracle for
engine tests with images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.config import DeepseekV2Config
from model.image_processing import ProcessedImage, process_image
from model.loading import save_pretrained
from model.projector import ProjectorConfig
from model.vision import VisionConfig
from model.vl2 import DeepseekVL2Config, DeepseekVL2ForCausalLM
from services.engine.sequence import ImageSpan
from tests.support.checkpoints import TINY_CONFIG
from tests.support.vl2_checkpoints import IMAGE_TOKEN_ID, VL2_VOCAB, write_vl2_tokenizer


def write_vl2_checkpoint(
    path: Path,
    *,
    seed: int = 0,
    tile: int = 56,
    vision_width: int = 32,
    vision_layers: int = 2,
    max_tiles: int = 2,
    **language: Any,
) -> Path:
    """A random DeepSeek-VL2 checkpoint written with model.save_pretrained: the shared tiny
    language config (overrides in ``language``), a small SigLIP-shaped tower on tile x tile
    pictures (patch 14), candidates up to max_tiles x max_tiles tiles, and the test
    tokenizer with an ``<image>`` token after its vocabulary."""
    values = {**TINY_CONFIG, "vocab_size": VL2_VOCAB, **language}
    lang = DeepseekV2Config.from_dict(values)
    config = DeepseekVL2Config(
        language=lang,
        vision=VisionConfig(
            image_size=tile,
            patch_size=14,
            width=vision_width,
            layers=vision_layers,
            heads=2,
            intermediate_size=2 * vision_width,
        ),
        projector=ProjectorConfig(input_dim=vision_width, n_embed=lang.hidden_size),
        candidate_resolutions=[
            (tile * w, tile * h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
        ],
        image_token_id=IMAGE_TOKEN_ID,
    )
    torch.manual_seed(seed)
    model = DeepseekVL2ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    # norms start at 1: make them random so a misplaced norm shows
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    save_pretrained(model, path)
    write_vl2_tokenizer(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "deepseek_vl_v2"
    return path


def picture(seed: int, size: tuple[int, int] = (90, 70)) -> Image.Image:
    """A random-noise RGB picture (each seed another picture)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def image_prompt(
    model: DeepseekVL2ForCausalLM,
    parts: list[list[int] | Image.Image],
    cropping: bool = True,
) -> tuple[list[int], list[ImageSpan]]:
    """Token ids and spans from text ids and pictures, in order."""
    ids: list[int] = []
    spans: list[ImageSpan] = []
    image_token = model.vl2_config.image_token_id
    for part in parts:
        if isinstance(part, Image.Image):
            processed = process_image(part, model.vl2_config.preprocess, cropping)
            spans.append(ImageSpan(len(ids), processed))
            ids.extend([image_token] * processed.num_tokens)
        else:
            ids.extend(part)
    return ids, spans


@torch.inference_mode()
def full_forward_greedy(
    model: DeepseekVL2ForCausalLM, ids: list[int], spans: list[ImageSpan], n: int
) -> list[int]:
    """n greedy tokens from plain full causal forwards over inputs_embeds (no cache, no
    engine): token embeddings with each image's rows in place."""
    images: list[ProcessedImage] = [s.image for s in spans]
    rows = model.embed_images(images)
    device = model.image_newline.device
    tokens = list(ids)
    for _ in range(n):
        x = model.embed_tokens(torch.tensor(tokens, device=device))  # [T, D]
        for span, r in zip(spans, rows, strict=True):
            x[span.start : span.end] = r
        logits = model(inputs_embeds=x[None])[0, -1]  # [V]
        tokens.append(int(logits.argmax()))
    return tokens[len(ids) :]
