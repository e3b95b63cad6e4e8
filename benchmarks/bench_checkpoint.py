"""What the benchmarks share: the random DeepSeek-V2 checkpoint of the engine and distributed
benchmarks, its prompts, a timed greedy run of the engine, and the released models' YaRN."""

from __future__ import annotations

import time
from pathlib import Path

import torch

# rope_scaling of the released DeepSeek-V2 and V2-Lite configs: YaRN factor 40 over 4K -> 160K
RELEASED_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

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


# The small model of the execution-layer issue: 6 layers, width 384, 16 routed experts top-4;
# per-step overhead (Python, kernel launches) weighs more there than weight reads.
SMALL_CONFIG = dict(
    BENCH_CONFIG,
    hidden_size=384,
    intermediate_size=1024,
    moe_intermediate_size=192,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=6,
    n_shared_experts=1,
    n_routed_experts=16,
)


def write_checkpoint(path: Path, config: dict | None = None) -> int:
    """A random checkpoint of `config` (BENCH_CONFIG by default) at `path`; its parameter
    count."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**(config or BENCH_CONFIG)))
    hf.save_pretrained(path)
    return sum(p.numel() for p in hf.parameters())


def random_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` random token ids (2 and up: 0/1 are bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, BENCH_CONFIG["vocab_size"], (count, length), generator=g).tolist()


def timed_generate(
    engine, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """Greedy, exactly new_tokens per prompt: (seconds, output token ids)."""
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]
