"""The memory floor's arithmetic: the bytes a decode step must read, checked against the
parameters of a real model built from the same config."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_checkpoint import SMALL_CONFIG
from benchmarks.memory_floor import (
    copy_bandwidth,
    decode_step_bytes,
    distinct_experts,
    floor_tokens_per_second,
)
from model.accounting import param_counts
from model.config import DeepseekV2Config
from model.transformer import DeepseekV2ForCausalLM


@pytest.fixture(scope="module")
def cfg() -> DeepseekV2Config:
    return DeepseekV2Config.from_dict(SMALL_CONFIG)


def test_one_sequence_reads_the_active_weights_and_one_embedding_row(cfg) -> None:
    # one token reaches exactly top-k experts per layer: DeepSeek's "active parameters"
    expected = (param_counts(cfg).active + cfg.hidden_size) * 2
    assert decode_step_bytes(cfg, "bfloat16", batch=1, context=0) == pytest.approx(expected)


def test_a_large_batch_reads_every_weight_but_the_embedding_table(cfg) -> None:
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
    table = model.model.embed_tokens.weight.numel()
    weights = sum(p.numel() for p in model.parameters()) - table
    batch = 4096  # every expert of every layer is reached
    step = decode_step_bytes(cfg, torch.float32, batch=batch, context=0)
    assert step == pytest.approx((weights + batch * cfg.hidden_size) * 4, rel=1e-9)


def test_cache_reads_grow_with_context_and_batch(cfg) -> None:
    per_token = cfg.num_hidden_layers * cfg.latent_cache_dim * 4
    base = decode_step_bytes(cfg, "float32", batch=8, context=0)
    assert decode_step_bytes(cfg, "float32", batch=8, context=100) - base == pytest.approx(
        8 * 100 * per_token
    )


def test_distinct_experts_saturates() -> None:
    assert distinct_experts(16, 4, 1) == pytest.approx(4)
    assert 4 < distinct_experts(16, 4, 2) < 8
    assert distinct_experts(16, 4, 200) == pytest.approx(16)


def test_floor_scales_with_bandwidth_and_batch(cfg) -> None:
    one = floor_tokens_per_second(cfg, "float32", 1, 64, bandwidth=10e9)
    assert floor_tokens_per_second(cfg, "float32", 1, 64, bandwidth=20e9) == pytest.approx(2 * one)
    # batching shares the weight reads: more tokens per second than one stream
    assert floor_tokens_per_second(cfg, "float32", 16, 64, bandwidth=10e9) > 4 * one


def test_copy_bandwidth_is_measured() -> None:
    bw = copy_bandwidth(megabytes=32, repeats=2)
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s: a number, not a placeholder
