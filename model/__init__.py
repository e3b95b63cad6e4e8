"""DeepSeek-V2 in PyTorch: config, MLA attention, DeepSeekMoE, checkpoint loading, tokenizer;
DeepSeek-VL2 (vision tower, projector, image tiling) on top of it.

Names are imported lazily, so ``import model.tokenizer`` (used by services that must not
load torch) does not pull in torch through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DeepseekV2Attention": "model.attention",
    "ConfigError": "model.config",
    "DeepseekV2Config": "model.config",
    "CheckpointError": "model.loading",
    "SafetensorsCheckpoint": "model.loading",
    "load_pretrained": "model.loading",
    "load_routed_experts": "model.loading",
    "save_pretrained": "model.loading",
    "CompletedExperts": "model.moe",
    "DeepseekV2MLP": "model.moe",
    "DeepseekV2MoE": "model.moe",
    "ExpertExecutor": "model.moe",
    "LocalExpertExecutor": "model.moe",
    "MoEGate": "model.moe",
    "PendingExperts": "model.moe",
    "RoutedExperts": "model.moe",
    "DeepseekV2DecoderLayer": "model.transformer",
    "DeepseekV2ForCausalLM": "model.transformer",
    "DeepseekV2Model": "model.transformer",
    "moe_layer_indices": "model.transformer",
    "PrefillChunk": "model.step",
    "StepMetadata": "model.step",
    "Tokenizer": "model.tokenizer",
    "IncrementalDetokenizer": "model.detokenizer",
    "DeepseekVL2Config": "model.vl2",
    "DeepseekVL2ForCausalLM": "model.vl2",
}

__all__ = [
    "CheckpointError",
    "CompletedExperts",
    "ConfigError",
    "DeepseekV2Attention",
    "DeepseekV2Config",
    "DeepseekV2DecoderLayer",
    "DeepseekV2ForCausalLM",
    "DeepseekV2MLP",
    "DeepseekV2MoE",
    "DeepseekV2Model",
    "DeepseekVL2Config",
    "DeepseekVL2ForCausalLM",
    "ExpertExecutor",
    "IncrementalDetokenizer",
    "LocalExpertExecutor",
    "MoEGate",
    "PendingExperts",
    "PrefillChunk",
    "RoutedExperts",
    "SafetensorsCheckpoint",
    "StepMetadata",
    "Tokenizer",
    "load_pretrained",
    "load_routed_experts",
    "moe_layer_indices",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from model.attention import DeepseekV2Attention
    from model.config import ConfigError, DeepseekV2Config
    from model.detokenizer import IncrementalDetokenizer
    from model.loading import (
        CheckpointError,
        SafetensorsCheckpoint,
        load_pretrained,
        load_routed_experts,
        save_pretrained,
    )
    from model.moe import (
        CompletedExperts,
        DeepseekV2MLP,
        DeepseekV2MoE,
        ExpertExecutor,
        LocalExpertExecutor,
        MoEGate,
        PendingExperts,
        RoutedExperts,
    )
    from model.step import PrefillChunk, StepMetadata
    from model.tokenizer import Tokenizer
    from model.transformer import (
        DeepseekV2DecoderLayer,
        DeepseekV2ForCausalLM,
        DeepseekV2Model,
        moe_layer_indices,
    )
    from model.vl2 import DeepseekVL2Config, DeepseekVL2ForCausalLM
