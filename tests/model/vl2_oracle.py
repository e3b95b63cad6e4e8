"""An oracle for DeepSeek-VL2 logits with images, composed of independent parts:
transformers' ``SiglipVisionModel`` (the vision tower), the ``downsample_mlp_gelu`` projector
written here from its definition (``F.unfold``), the 2D token layout written here as plain
loops, and a transformers language model class run with ``inputs_embeds``.

Reusable for every language model: ``VL2Oracle(checkpoint, language_cls, workdir)`` with
``language_cls`` = ``transformers.DeepseekV2ForCausalLM`` or ``DeepseekV3ForCausalLM``; the
language tensors (``language.*``) and ``language_config`` of the VL2 checkpoint are written
back out as a text checkpoint in ``workdir`` for ``language_cls.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from tests.support.vl2_checkpoints import siglip_config, timm_to_siglip


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
    def __init__(self, checkpoint: str | Path, language_cls: Any, workdir: str | Path) -> None:
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
        language = {
            k.removeprefix("language."): v for k, v in tensors.items() if k.startswith("language.")
        }
        save_file(language, str(workdir / "model.safetensors"), metadata={"format": "pt"})
        (workdir / "config.json").write_text(
            json.dumps(config["language_config"]), encoding="utf-8"
        )
        self.language = language_cls.from_pretrained(workdir, dtype=torch.float32).eval()
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
