"""DeepSeek-V2 in PyTorch: config, MLA attention, DeepSeekMoE, checkpoint loading, tokenizer.

The tokenizer lives in ``model.tokenizer`` / ``model.detokenizer`` and imports no torch; import
it from there when torch is not wanted.
"""

from model.attention import DeepseekV2Attention
from model.config import ConfigError, DeepseekV2Config
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
from model.transformer import (
    DeepseekV2DecoderLayer,
    DeepseekV2ForCausalLM,
    DeepseekV2Model,
    moe_layer_indices,
)

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
    "ExpertExecutor",
    "LocalExpertExecutor",
    "MoEGate",
    "PendingExperts",
    "RoutedExperts",
    "SafetensorsCheckpoint",
    "load_pretrained",
    "load_routed_experts",
    "moe_layer_indices",
    "save_pretrained",
]
