"""DeepSeek-V2 configuration read from a Hugging Face ``config.json``.

Every field of the published DeepSeek-V2 / V2-Lite configs is a dataclass field, plus the two
language-model variants DeepSeek-VL2 adds: ``use_mla: false`` (VL2-Tiny: plain multi-head
attention with Llama-style RoPE) and ``topk_method: noaux_tc`` (VL2: sigmoid routing with a
score-correction bias, DeepSeek-V3 style). Both the legacy ``rope_scaling`` block (as
published) and transformers 5's ``rope_parameters`` block are read. Values this implementation
cannot honour fail here, at load time, with a message naming the field and what is supported.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SUPPORTED_SCORING_FUNCS = ("softmax", "sigmoid")
SUPPORTED_ACTIVATIONS = ("silu",)


class ConfigError(ValueError):
    """A config.json this implementation cannot run, with the reason and the fix."""


@dataclass
class DeepseekV2Config:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # Legacy block as published: {"type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}; None means plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # False: plain multi-head attention (q/k/v/o projections, non-interleaved RoPE over the
    # whole head of hidden_size // num_attention_heads), as DeepSeek-VL2-Tiny's language model
    use_mla: bool = True
    torch_dtype: str | None = None
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV2ForCausalLM"])
    model_type: str = "deepseek_v2"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: MLA's nope + rope parts, or the plain MHA head."""
        if not self.use_mla:
            return self.head_dim
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """Plain multi-head attention's head width (``use_mla: false``), as Llama defines it."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Dims RoPE rotates per head: MLA's decoupled rope part, or the whole MHA head."""
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    @property
    def latent_cache_dim(self) -> int:
        """MLA: values cached per token per layer, the normed latent plus the shared roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values the paged cache holds per token per layer, by attention kind: MLA's latent
        row (``latent_cache_dim``), or MHA's roped keys then values of every key/value head."""
        if self.use_mla:
            return self.latent_cache_dim
        return 2 * self.num_key_value_heads * self.head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("type") or self.rope_scaling.get("rope_type") or "default")

    def is_moe_layer(self, layer_idx: int) -> bool:
        # Same rule as DeepSeek's reference code.
        return (
            self.n_routed_experts is not None
            and self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        if self.topk_method not in SUPPORTED_TOPK_METHODS:
            raise ConfigError(
                f"topk_method={self.topk_method!r} is not supported; "
                f"DeepSeek-V2 uses one of {SUPPORTED_TOPK_METHODS}"
            )
        if self.scoring_func not in SUPPORTED_SCORING_FUNCS:
            raise ConfigError(
                f"scoring_func={self.scoring_func!r} is not supported; "
                f"DeepSeek-V2 uses one of {SUPPORTED_SCORING_FUNCS}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}"
            )
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(
                f"rope_scaling type {self.rope_type!r} is not supported; use 'yarn' or no rope_scaling"
            )
        if self.use_mla:
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            if self.num_key_value_heads != self.num_attention_heads:
                raise ConfigError(
                    "MLA expands the latent into one key/value per query head: "
                    f"num_key_value_heads ({self.num_key_value_heads}) must equal "
                    f"num_attention_heads ({self.num_attention_heads})"
                )
        else:
            self._validate_mha()
        if self.n_routed_experts:
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"[1, n_routed_experts={self.n_routed_experts}]"
                )
            if self.moe_layer_freq < 1:
                raise ConfigError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
            if self.topk_method in ("group_limited_greedy", "noaux_tc"):
                self._validate_groups()
            if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
                raise ConfigError(
                    f"topk_method='noaux_tc' routes on sigmoid scores: scoring_func must be "
                    f"'sigmoid', got {self.scoring_func!r}"
                )

    def _validate_groups(self) -> None:
        n_experts, k = self.n_routed_experts or 0, self.num_experts_per_tok or 0
        n_group, topk_group = self.n_group or 0, self.topk_group or 0
        if n_group < 1 or n_experts % n_group:
            raise ConfigError(
                f"{self.topk_method} needs n_group >= 1 dividing n_routed_experts "
                f"({n_experts}), got n_group={self.n_group}"
            )
        if not 1 <= topk_group <= n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={n_group}]")
        per_group = n_experts // n_group
        if topk_group * per_group < k:
            raise ConfigError(
                f"topk_group={topk_group} groups of {per_group} "
                f"experts cannot supply num_experts_per_tok={k}"
            )
        if self.topk_method == "noaux_tc" and per_group < 2:
            raise ConfigError(
                "noaux_tc scores a group by the sum of its 2 best experts: n_group "
                f"({n_group}) must leave >= 2 experts per group of n_routed_experts ({n_experts})"
            )

    def _validate_mha(self) -> None:
        """``use_mla: false``: Llama-style attention over hidden_size // num_attention_heads."""
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h < 1 or self.hidden_size % h:
            raise ConfigError(
                f"use_mla=false splits hidden_size ({self.hidden_size}) into "
                f"num_attention_heads ({h}) heads: it must divide it"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"use_mla=false rotates the whole head: hidden_size / num_attention_heads "
                f"({self.head_dim}) must be even"
            )
        if not kv or kv < 1 or h % kv:
            raise ConfigError(f"num_key_value_heads ({kv}) must divide num_attention_heads ({h})")
        if self.rope_type != "default":
            raise ConfigError(
                f"rope_scaling type {self.rope_type!r} is not supported with use_mla=false "
                "(DeepSeek-VL2-Tiny uses plain RoPE): remove rope_scaling"
            )

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepseekV2Config:
        data = dict(data)
        model_type = data.get("model_type", "deepseek_v2")
        if model_type != "deepseek_v2":
            raise ConfigError(
                f"model_type={model_type!r}: this implementation runs DeepSeek-V2 ('deepseek_v2')"
            )
        # transformers >= 5 writes rope_parameters (rope_type + rope_theta inside) instead of
        # the published rope_theta + rope_scaling pair; fold it back into the published form.
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters:
            params = dict(rope_parameters)
            if "rope_theta" in params:
                data.setdefault("rope_theta", params.pop("rope_theta"))
            rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
            params.pop("type", None)
            if rope_type != "default" and not data.get("rope_scaling"):
                data["rope_scaling"] = {"type": rope_type, **params}
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.get("dtype")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DeepseekV2Config:
        """Read ``config.json`` from a checkpoint directory or from the file itself. For a
        DeepSeek-VL2 checkpoint (model_type "deepseek_vl_v2") this is its language model's
        config (what expert shards and cache planning size themselves from)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("model_type") == "deepseek_vl_v2":
            from model.vl2 import DeepseekVL2Config  # the VL2 checks (use_mla, sections)

            return DeepseekVL2Config.from_dict(data).language
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path
