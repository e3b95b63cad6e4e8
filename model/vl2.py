"""DeepSeek-VL2: SigLIP vision tower + ``downsample_mlp_gelu`` projector + the DeepSeek-V2
language model, behind the same engine-facing surface as ``DeepseekV2ForCausalLM``.

``DeepseekVL2ForCausalLM`` holds the published modules under the published names
(``vision.*``, ``projector.*``, ``image_newline``, ``view_seperator`` (sic), ``language.*``).
For the engine it *is* the language model: ``.config`` is the language config and forward,
``bind_kv_cache``, ``moe_layers``, ``set_expert_executor``, ``pack_for_inference``, ``.model``,
``.lm_head`` go to it, so a text-only request runs exactly as on a DeepSeek-V2 checkpoint.
Images enter as ``inputs_embeds``: ``embed_images`` turns each ``ProcessedImage`` into its
``num_tokens`` rows, which the caller splices in at the image's ``<image>`` positions.

Token layout per image (tile_tag "2D", global_view_pos "head"):
    global view: h rows of (h embeddings + image_newline)
    view_seperator
    local view: the nw x nh tiles stitched into one (h*nh) x (h*nw) grid, image_newline
    after every row
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from model.config import ConfigError, DeepseekV2Config
from model.image_layout import Resolution, tokens_per_tile_side
from model.image_processing import VisionPreprocessConfig
from model.moe import DeepseekV2MoE, ExpertExecutor
from model.projector import DownsampleMlpProjector, ProjectorConfig
from model.step import StepMetadata
from model.transformer import DeepseekV2ForCausalLM, ExpertsSpec
from model.vision import SiglipVisionTower, VisionConfig

if TYPE_CHECKING:
    from model.image_processing import ProcessedImage

VL2_MODEL_TYPE = "deepseek_vl_v2"
IMAGE_TOKEN = "<image>"


@dataclass
class DeepseekVL2Config:
    language: DeepseekV2Config
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    candidate_resolutions: list[Resolution] = field(default_factory=lambda: [(384, 384)])
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    # the tokenizer's "<image>" id; config.json rarely has it: the loader then reads the
    # checkpoint's tokenizer.json (None: no tokenizer, no id known)
    image_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.tile_tag != "2D":
            raise ConfigError(
                f"tile_tag={self.tile_tag!r} is not supported; DeepSeek-VL2 checkpoints use '2D'"
            )
        if self.global_view_pos != "head":
            raise ConfigError(
                f"global_view_pos={self.global_view_pos!r} is not supported; "
                "DeepSeek-VL2 checkpoints use 'head'"
            )
        if self.projector.input_dim != self.vision.width:
            raise ConfigError(
                f"projector_config.input_dim ({self.projector.input_dim}) must equal "
                f"vision_config.width ({self.vision.width})"
            )
        if self.projector.n_embed != self.language.hidden_size:
            raise ConfigError(
                f"projector_config.n_embed ({self.projector.n_embed}) must equal "
                f"language_config.hidden_size ({self.language.hidden_size})"
            )
        try:
            self.candidate_resolutions = [(int(w), int(h)) for w, h in self.candidate_resolutions]
        except (TypeError, ValueError) as e:
            raise ConfigError(
                "candidate_resolutions must be a list of [width, height] pairs, got "
                f"{self.candidate_resolutions!r}"
            ) from e
        try:
            self.preprocess  # noqa: B018  # validates the candidates against the tile size
        except ValueError as e:
            raise ConfigError(f"candidate_resolutions: {e}") from e

    @property
    def preprocess(self) -> VisionPreprocessConfig:
        return VisionPreprocessConfig(
            tile_size=self.vision.image_size,
            patch_size=self.vision.patch_size,
            downsample_ratio=self.projector.downsample_ratio,
            candidate_resolutions=list(self.candidate_resolutions),
        )

    @property
    def tokens_per_tile_side(self) -> int:
        return tokens_per_tile_side(
            self.vision.image_size, self.vision.patch_size, self.projector.downsample_ratio
        )

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepseekVL2Config:
        model_type = data.get("model_type")
        if model_type != VL2_MODEL_TYPE:
            raise ConfigError(
                f"model_type={model_type!r}: a DeepSeek-VL2 config has {VL2_MODEL_TYPE!r}"
            )
        sections = {}
        for key in ("language_config", "vision_config", "projector_config"):
            value = data.get(key)
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key} must be an object in a DeepSeek-VL2 config.json, got {value!r}"
                )
            sections[key] = value
        language = dict(sections["language_config"])
        # a field this build cannot honour must not be dropped silently
        known = {f.name for f in dataclasses.fields(DeepseekV2Config)}
        if language.get("use_mla", True) is False and "use_mla" not in known:
            raise ConfigError(
                "language_config.use_mla=false (plain multi-head attention, as in "
                "DeepSeek-VL2-Tiny) is not supported by this build"
            )
        language.setdefault("model_type", "deepseek_v2")
        try:
            lang = DeepseekV2Config.from_dict(language)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"language_config: {e}") from e
        try:
            vision = VisionConfig.from_dict(sections["vision_config"])
            projector = ProjectorConfig.from_dict(sections["projector_config"])
        except TypeError as e:
            raise ConfigError(f"vision_config/projector_config: {e}") from e
        kwargs: dict[str, Any] = {}
        for key in ("candidate_resolutions", "tile_tag", "global_view_pos", "image_token_id"):
            if key in data:
                kwargs[key] = data[key]
        dtype = data.get("torch_dtype") or data.get("dtype")
        return cls(language=lang, vision=vision, projector=projector, torch_dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DeepseekVL2Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        """The published config.json layout."""
        language = self.language.to_dict()
        out: dict[str, Any] = {
            "architectures": ["DeepseekVLV2ForCausalLM"],
            "model_type": VL2_MODEL_TYPE,
            "language_config": language,
            "vision_config": self.vision.to_dict(),
            "projector_config": self.projector.to_dict(),
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "tile_tag": self.tile_tag,
            "global_view_pos": self.global_view_pos,
        }
        if self.image_token_id is not None:
            out["image_token_id"] = self.image_token_id
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def read_model_type(path: str | Path) -> str:
    """``model_type`` of a checkpoint directory's config.json (or of the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return str(json.loads(path.read_text(encoding="utf-8")).get("model_type", "deepseek_v2"))


class DeepseekVL2ForCausalLM(nn.Module):
    """DeepSeek-VL2: images -> ``embed_images``; text and spliced embeddings -> ``forward``
    (the language model's)."""

    def __init__(self, config: DeepseekVL2Config, experts: ExpertsSpec = "all") -> None:
        super().__init__()
        self.vl2_config = config
        self.config = config.language  # what the engine sizes its cache and limits from
        self.vision = SiglipVisionTower(config.vision)
        self.projector = DownsampleMlpProjector(config.projector)
        d = config.projector.n_embed
        # learned layout vectors (not vocabulary tokens): end of a row, between the views
        self.image_newline = nn.Parameter(torch.empty(d))
        self.view_seperator = nn.Parameter(torch.empty(d))  # sic: the published name
        self.language = DeepseekV2ForCausalLM(config.language, experts)
        if self.image_newline.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init: the language model's own, N(0, 0.02) vision/projector weights, the
        layout vectors N(0, 1/n_embed) as the reference draws them."""
        self.language.init_weights(generator)
        self.vision.init_weights(generator=generator)
        for module in self.projector.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02, generator=generator)
                module.bias.zero_()
        std = self.vl2_config.projector.n_embed**-0.5
        self.image_newline.normal_(0.0, std, generator=generator)
        self.view_seperator.normal_(0.0, std, generator=generator)

    # ---- the language model's surface (what the engine uses) ------------------------------
    @property
    def model(self) -> nn.Module:
        return self.language.model

    @property
    def lm_head(self) -> nn.Module:
        return self.language.lm_head

    @property
    def expert_slice(self) -> tuple[int, int] | None:
        return self.language.expert_slice

    def moe_layers(self) -> list[DeepseekV2MoE]:
        return self.language.moe_layers()

    def set_expert_executor(self, executor: ExpertExecutor | None) -> None:
        self.language.set_expert_executor(executor)

    def pack_for_inference(self, prepack: bool = False) -> None:
        """The language model's inference layout (model.packing); the vision side runs as
        loaded (it runs once per image, not per decode step)."""
        self.language.pack_for_inference(prepack=prepack)

    def bind_kv_cache(self, cache: Tensor | None) -> None:
        self.language.bind_kv_cache(cache)

    def set_fused_decode(self, enabled: bool) -> None:
        self.language.set_fused_decode(enabled)

    def forward(
        self,
        input_ids: Tensor | None = None,
        positions: Tensor | None = None,
        step: StepMetadata | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        return_balance_loss: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The language model's forward (see ``DeepseekV2ForCausalLM.forward``); images come
        in through ``inputs_embeds`` built with ``embed_tokens`` + ``embed_images``."""
        return self.language(
            input_ids,
            positions,
            step,
            inputs_embeds=inputs_embeds,
            return_balance_loss=return_balance_loss,
            logits_at=logits_at,
        )

    # ---- images ---------------------------------------------------------------------------
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """[...] token ids -> [..., D] input embeddings."""
        return self.language.model.embed_tokens(input_ids)

    def embed_images(self, images: list[ProcessedImage]) -> list[Tensor]:
        """Each image -> [num_tokens, D] rows in the model's dtype and on its device, in the
        2D layout (global view first). All tiles of all images go through the vision tower
        in one batch. Runs in the caller's grad mode (training a vision stage needs the
        gradients; inference wraps it in ``torch.inference_mode()``)."""
        if not images:
            return []
        weight = self.image_newline
        device, dtype = weight.device, weight.dtype
        h = self.vl2_config.tokens_per_tile_side
        for img in images:
            want = img.layout.num_tiles
            if img.tiles.shape[0] != want:
                raise ValueError(
                    f"image with layout {img.layout} has {img.tiles.shape[0]} tiles, expected {want}"
                )
        pixels = torch.cat([img.tiles for img in images]).to(device=device, dtype=dtype)
        feats = self.projector(self.vision(pixels))  # [tiles, h*h, D]
        d = feats.shape[-1]
        out: list[Tensor] = []
        first = 0
        for img in images:
            nw, nh = img.layout.nw, img.layout.nh
            tiles = feats[first : first + 1 + nw * nh]
            first += 1 + nw * nh
            newline = self.image_newline.view(1, 1, d)
            # global: [h, h, D] + a newline column -> [h*(h+1), D]
            glob = torch.cat([tiles[0].view(h, h, d), newline.expand(h, 1, d)], dim=1)
            # local: [nh, nw, h, h, D] -> [nh, h, nw, h, D] -> one [nh*h, nw*h, D] grid
            local = (
                tiles[1:].view(nh, nw, h, h, d).permute(0, 2, 1, 3, 4).reshape(nh * h, nw * h, d)
            )
            local = torch.cat([local, newline.expand(nh * h, 1, d)], dim=1)
            rows = torch.cat(
                [glob.reshape(-1, d), self.view_seperator.view(1, d), local.reshape(-1, d)]
            )
            if rows.shape[0] != img.num_tokens:
                raise ValueError(
                    f"image embeds into {rows.shape[0]} rows but was counted as "
                    f"{img.num_tokens} prompt positions (preprocessed for another model?)"
                )
            out.append(rows)
        return out
