"""The random DeepSeek-V2 checkpoint the engine and distributed benchmarks share."""

from __future__ import annotations

from pathlib import Path

import torch

# hidden 512, 8 layers, 32 routed experts top-4 (as in DESIGN's peer measurements)
BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_shared_experts=2,
    n_routed_experts=32,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    q_lora_rank=None,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    max_position_embeddings=4096,
    bos_token_id=0,
    eos_token_id=1,
    initializer_range=0.02,
)


def write_checkpoint(path: Path) -> int:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**BENCH_CONFIG))
    hf.save_pretrained(path)
    return sum(p.numel() for p in hf.parameters())
