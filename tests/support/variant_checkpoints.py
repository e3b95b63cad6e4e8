"""Tiny random checkpoints of DeepSeek-VL2's two extra language models, with their oracles.

- ``noaux_tc`` routing (DeepSeek-VL2): written by transformers' ``DeepseekV3ForCausalLM``,
  whose router is the same algorithm (sigmoid scores, ``e_score_correction_bias`` for the
  choice, groups ranked by their two best biased scores, unbiased weights normalised and
  scaled). The one difference, unselected groups filled with -inf there and 0.0 in
  DeepSeek's code, only shows when biased scores go negative; the bias drawn here keeps them
  positive, so the two agree (``tests/model/test_lm_variants.py`` checks the 0.0 case
  separately).
- ``use_mla: false`` (DeepSeek-VL2-Tiny): transformers has no DeepSeek-MoE class with plain
  attention, so the oracle is composed of transformers' parts the way DeepSeek-VL2's own code
  composes it: ``DeepseekV2ForCausalLM`` (norms, dense MLP, router, experts) with each layer's
  attention replaced by transformers' ``LlamaAttention`` (DeepSeek-VL2's modeling code imports
  LlamaAttention for ``use_mla: false``) fed by ``LlamaRotaryEmbedding`` (non-interleaved RoPE
  over the whole head).

``write_*_checkpoint(path, seed, **overrides)`` write config.json (this project's published
layout, with ``use_mla``/``topk_method`` as VL2's language_config has them), safetensors with
the published tensor names and the test tokenizer; ``load_*_oracle(path)`` build the oracle
from a checkpoint, float32, eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import DeepseekV2Config
from tests.support.checkpoints import TINY_CONFIG, _perturb_norms, write_tokenizer

# DeepSeek-VL2's language model, scaled down: no q compression, no YaRN, sigmoid routing with
# the correction bias over 16 experts in 4 groups (2 kept), weights normalised and x 2.0.
NOAUX_CONFIG: dict[str, Any] = {
    **TINY_CONFIG,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.0,
    "q_lora_rank": None,
    "rope_scaling": None,
}

# DeepSeek-VL2-Tiny's language model, scaled down: plain MHA (64 / 4 = 16 dims per head),
# greedy softmax routing, no YaRN. The MLA fields stay in config.json (as published) unused.
MHA_CONFIG: dict[str, Any] = {
    **TINY_CONFIG,
    "use_mla": False,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
}


def _write_config(path: Path, config: DeepseekV2Config, dtype: torch.dtype) -> None:
    published = config.to_dict()
    published["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(published, indent=2) + "\n", encoding="utf-8")


# ---- noaux_tc: transformers' DeepseekV3 ------------------------------------------------------
def _v3_config(config: DeepseekV2Config) -> Any:
    from transformers import DeepseekV3Config

    if config.moe_layer_freq != 1 or config.rope_scaling:
        raise ValueError("the DeepseekV3 oracle needs moe_layer_freq 1 and no rope_scaling")
    keys = (
        "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
        "num_attention_heads num_key_value_heads n_shared_experts n_routed_experts "
        "num_experts_per_tok routed_scaling_factor n_group topk_group first_k_dense_replace "
        "norm_topk_prob q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim "
        "hidden_act max_position_embeddings initializer_range rms_norm_eps bos_token_id "
        "eos_token_id tie_word_embeddings attention_bias"
    ).split()
    values = {k: getattr(config, k) for k in keys}
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    return DeepseekV3Config(**values, rope_interleave=True, num_nextn_predict_layers=0)


def write_noaux_checkpoint(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Path:
    from transformers import DeepseekV3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = DeepseekV2Config.from_dict({**NOAUX_CONFIG, **overrides})
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(_v3_config(config))
    _perturb_norms(hf, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # comparable to the spread of the sigmoid scores, so it changes choices, but
                # small enough that every biased score stays positive
                buf.copy_(0.1 * (2 * torch.rand(buf.shape, generator=g) - 1))
    hf.to(dtype).save_pretrained(path)
    _write_config(path, config, dtype)
    write_tokenizer(path)
    return path


def load_noaux_oracle(path: str | Path) -> nn.Module:
    from transformers import DeepseekV3ForCausalLM

    config = DeepseekV2Config.from_pretrained(path)
    hf = DeepseekV3ForCausalLM(_v3_config(config))
    _load_published(hf, Path(path))
    return hf.float().eval()


# ---- use_mla: false: transformers' DeepseekV2 with LlamaAttention -----------------------------
def _llama_attention_class() -> type:
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    class LlamaAttentionWithRope(LlamaAttention):
        """LlamaAttention that computes its own (Llama) cos/sin from ``position_ids``: the
        DeepseekV2 decoder layer hands it DeepSeek's interleaved rotations, not Llama's."""

        def __init__(self, llama_config: Any, layer_idx: int) -> None:
            super().__init__(llama_config, layer_idx)
            self.rotary = LlamaRotaryEmbedding(llama_config)

        def forward(  # type: ignore[override]
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            kwargs.pop("position_embeddings", None)
            kwargs.pop("past_key_values", None)
            kwargs.pop("use_cache", None)
            cos_sin = self.rotary(hidden_states, position_ids)
            return super().forward(hidden_states, cos_sin, attention_mask)

    return LlamaAttentionWithRope


def build_mha_oracle(config: DeepseekV2Config) -> nn.Module:
    """transformers' DeepseekV2ForCausalLM with LlamaAttention in every layer (random init)."""
    from transformers import DeepseekV2Config as HFConfig
    from transformers import DeepseekV2ForCausalLM, LlamaConfig

    if config.moe_layer_freq != 1 or config.norm_topk_prob or config.topk_method == "noaux_tc":
        raise ValueError("transformers' DeepseekV2 router: moe_layer_freq 1, no norm_topk_prob")
    skip = {"moe_layer_freq", "scoring_func", "aux_loss_alpha", "seq_aux", "rope_scaling"}
    skip |= {"torch_dtype", "architectures", "model_type", "use_mla"}
    values = {k: v for k, v in config.to_dict().items() if k not in skip}
    hf_config = HFConfig(**values)
    hf_config._attn_implementation = "eager"  # an explicit causal mask for every layer
    hf = DeepseekV2ForCausalLM(hf_config)
    llama = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        attention_bias=config.attention_bias,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    llama._attn_implementation = "eager"  # the explicit causal mask the V2 model builds
    cls = _llama_attention_class()
    std = config.initializer_range
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn = cls(llama, i)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            nn.init.normal_(proj.weight, 0.0, std)
        nn.init.normal_(layer.self_attn.o_proj.weight, 0.0, std)
    return hf


def _published_state(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The oracle's weights under the published names (routed experts one by one)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, w in enumerate(t):
                out[f"{prefix}{e}.down_proj.weight"] = w
        else:
            out[name] = t
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _load_published(hf: nn.Module, path: Path) -> None:
    """Load a published-name single-file checkpoint into a transformers model (experts
    stacked back into its [E, ...] tensors), strictly."""
    flat = load_file(str(path / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for name, t in hf.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            state[name] = torch.stack(
                [
                    torch.cat(
                        [
                            flat.pop(f"{prefix}{e}.gate_proj.weight"),
                            flat.pop(f"{prefix}{e}.up_proj.weight"),
                        ]
                    )
                    for e in range(t.shape[0])
                ]
            )
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            state[name] = torch.stack(
                [flat.pop(f"{prefix}{e}.down_proj.weight") for e in range(t.shape[0])]
            )
        else:
            state[name] = flat.pop(name)
    if flat:
        raise KeyError(f"checkpoint tensors the oracle has no place for: {sorted(flat)[:5]}")
    hf.load_state_dict(state, strict=True)


def write_mha_checkpoint(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = DeepseekV2Config.from_dict({**MHA_CONFIG, **overrides})
    torch.manual_seed(seed)
    hf = build_mha_oracle(config)
    _perturb_norms(hf, seed)
    state = {k: v.to(dtype) for k, v in _published_state(hf).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    _write_config(path, config, dtype)
    write_tokenizer(path)
    return path


def load_mha_oracle(path: str | Path) -> nn.Module:
    hf = build_mha_oracle(DeepseekV2Config.from_pretrained(path))
    _load_published(hf, Path(path))
    return hf.float().eval()
