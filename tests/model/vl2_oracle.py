"""An oracle for DeepSeek-VL2 logits with images, composed of independent parts:
transformers' ``SiglipVisionModel`` (the vision tower), the ``downsample_mlp_gelu`` projector
written here from its definition (``F.unfold``), the 2D token layout written here as plain
loops, and a transformers language model class run with ``inputs_embeds``.

Reusable for every language model: ``VL2Oracle(checkpoint, language, workdir)`` where
``language`` is a transformers class (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``:
its ``from_pretrained`` is used) or any function ``path -> model`` (e.g. an oracle loader of
tests/support/variant_checkpoints.py). The language tensors (``language.*``) and
``language_config`` of the VL2 checkpoint are written back out as a text checkpoint in the
published layout in ``workdir`` and loaded from there.

``check_against_oracle(checkpoint, language, workdir, pictures)`` is the whole must-show
comparison (logits of a two-turn conversation with the pictures, <= 1e-4) for one VL2
checkpoint; ``tests/model/test_vl2_exactness.py`` runs it for DeepSeek-V2 language models.
A VL2 checkpoint around any text checkpoint: ``tests.support.vl2_checkpoints.wrap_as_vl2``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

import model
from model.image_processing import process_image
from model.vl2_prompt import render_vl2_conversation, tokenize_with_images
from tests.support.vl2_checkpoints import IMAGE_TOKEN_ID, siglip_config, timm_to_siglip


def project_by_definition(patches: Tensor, w: dict[str, Tensor], ratio: int) -> Tensor:
    """[B, g*g, C] -> [B, ceil(g/r)^2, n_embed]: zero-pad bottom/right, unfold r x r blocks
    (channel-major), Linear -> GELU (erf) -> Linear."""
    b, n, c = patches.shape
    g = int(n**0.5)
    x = patches.reshape(b, g, g, c)
    pad = (ratio - g % ratio) % ratio
    x = F.pad(x, (0, 0, 0, pad, 0, pad))
    x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=ratio, stride=ratio).transpose(1, 2)
    x = F.linear(x, w["projector.layers.0.weight"], w["projector.layers.0.bias"])
    return F.linear(F.gelu(x), w["projector.layers.2.weight"], w["projector.layers.2.bias"])


def layout_by_definition(
    tiles: Tensor, nw: int, nh: int, newline: Tensor, separator: Tensor
) -> Tensor:
    """[1 + nw*nh, h*h, D] tile embeddings -> the image's rows: global rows each followed by
    a newline, the separator, then the local tiles side by side, a newline per row."""
    h = int(tiles.shape[1] ** 0.5)
    rows: list[Tensor] = []
    for r in range(h):
        rows += [tiles[0, r * h + c] for c in range(h)] + [newline]
    rows.append(separator)
    for big_r in range(nh * h):
        for big_c in range(nw * h):
            tile = 1 + (big_r // h) * nw + big_c // h
            rows.append(tiles[tile, (big_r % h) * h + big_c % h])
        rows.append(newline)
    return torch.stack(rows)


class VL2Oracle:
    def __init__(self, checkpoint: str | Path, language: Any, workdir: str | Path) -> None:
        from transformers import SiglipVisionModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        checkpoint, workdir = Path(checkpoint), Path(workdir)
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        self.config = config
        tensors = load_file(str(checkpoint / "model.safetensors"))
        tensors = {k: v.float() for k, v in tensors.items()}
        self.weights = tensors
        vision = {
            k.removeprefix("vision."): v for k, v in tensors.items() if k.startswith("vision.")
        }
        self.vision = SiglipVisionModel(siglip_config(config["vision_config"])).eval()
        missing, unexpected = self.vision.load_state_dict(timm_to_siglip(vision), strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        # the language model as a text checkpoint of its own
        workdir.mkdir(parents=True, exist_ok=True)
        language_tensors = {
            k.removeprefix("language."): v for k, v in tensors.items() if k.startswith("language.")
        }
        save_file(language_tensors, str(workdir / "model.safetensors"), metadata={"format": "pt"})
        (workdir / "config.json").write_text(
            json.dumps(config["language_config"]), encoding="utf-8"
        )
        if hasattr(language, "from_pretrained"):
            self.language = language.from_pretrained(workdir, dtype=torch.float32).eval()
        else:
            self.language = language(workdir).eval()
        self.ratio = config["projector_config"]["downsample_ratio"]

    @torch.no_grad()
    def image_rows(self, image: Any) -> Tensor:
        """A ProcessedImage -> its [num_tokens, D] rows."""
        feats = self.vision(pixel_values=image.tiles.float()).last_hidden_state
        tiles = project_by_definition(feats, self.weights, self.ratio)
        return layout_by_definition(
            tiles,
            image.layout.nw,
            image.layout.nh,
            self.weights["image_newline"],
            self.weights["view_seperator"],
        )

    @torch.no_grad()
    def logits(self, ids: list[int], images: list[Any], starts: list[int]) -> Tensor:
        """[T, V] logits of the prompt ``ids`` with each image's rows at ``starts``."""
        input_ids = torch.tensor([ids])
        embeds = self.language.get_input_embeddings()(input_ids).clone()  # [1, T, D]
        for start, image in zip(starts, images, strict=True):
            rows = self.image_rows(image)
            embeds[0, start : start + rows.shape[0]] = rows
        return self.language(inputs_embeds=embeds).logits[0]


def noise_picture(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB picture (smooth blobs plus noise, so resizing keeps structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 21, (height, width, 3))
    pixels = np.clip(np.asarray(base, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def prompt_with_images(m: Any, tokenizer: Any, pictures: list[Image.Image]):
    """Tokens of a two-turn conversation showing ``pictures`` in its last user turn, the
    start of each image's run, and the ProcessedImages (cropping only with <= 2 pictures)."""
    cropping = len(pictures) <= 2
    images = [process_image(p, m.vl2_config.preprocess, cropping) for p in pictures]
    tags = "".join("<image>\n" for _ in pictures)
    text = render_vl2_conversation(
        [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi! How are you?"},
            {"role": "user", "content": f"{tags}What is in the picture?"},
        ],
        system_prompt="You are a helpful assistant.",
    )
    ids, starts = tokenize_with_images(tokenizer, text, images, m.vl2_config.image_token_id)
    return ids, starts, images


def ours_logits(m: Any, ids: list[int], starts: list[int], images: list[Any]) -> Tensor:
    """This project's [T, V] logits: token embeddings with each image's rows spliced in."""
    with torch.no_grad():
        embeds = m.embed_tokens(torch.tensor(ids))  # [T, D]
        for start, rows in zip(starts, m.embed_images(images), strict=True):
            embeds[start : start + rows.shape[0]] = rows
        return m(inputs_embeds=embeds.unsqueeze(0))[0]


def check_against_oracle(
    checkpoint: str | Path,
    language: Any,
    workdir: str | Path,
    pictures: list[Image.Image],
    image_token_id: int = IMAGE_TOKEN_ID,
) -> float:
    """Load ``checkpoint`` with model.load_pretrained, run a conversation with ``pictures``
    (its tokenizer names `image_token_id`) and assert its logits are within 1e-4 of the
    oracle's; returns the max difference."""
    from model.tokenizer import Tokenizer

    m = model.load_pretrained(checkpoint)
    assert isinstance(m, model.DeepseekVL2ForCausalLM)
    assert m.vl2_config.image_token_id == image_token_id  # found in the tokenizer.json
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids, starts, images = prompt_with_images(m, tokenizer, pictures)
    oracle = VL2Oracle(checkpoint, language, workdir)
    got = ours_logits(m, ids, starts, images)
    want = oracle.logits(ids, images, starts)
    assert got.shape == want.shape == (len(ids), m.config.vocab_size)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, diff
    assert want.std().item() > 0.1  # logits carry signal: the bound is not trivially met
    # the pictures matter: after them, logits differ from the same prompt without images
    text_only = ours_logits(m, [i if i != image_token_id else 5 for i in ids], [], [])
    last = starts[-1] + images[-1].num_tokens
    assert (text_only[last:] - got[last:]).abs().max().item() > 1e-2
    return diff
