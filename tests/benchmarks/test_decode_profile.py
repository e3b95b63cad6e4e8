"""decode_profile times the engine's own decode step and splits it into weight products,
attention and other ops: on a tiny random checkpoint its step yields one row of logits per
sequence and its categories find the weight products (an op renamed in torch would leave
them at 0% and fail here, instead of reporting a wrong breakdown)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_checkpoint import SMALL_CONFIG, write_checkpoint
from benchmarks.decode_profile import decode_step, gemv_reader, profile_shares

TINY = dict(
    SMALL_CONFIG,
    hidden_size=64,
    num_hidden_layers=2,
    vocab_size=512,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from services.engine import Engine

    path = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(path, TINY)
    engine = Engine.from_pretrained(path, dtype=torch.float32, max_num_seqs=4)
    return engine.runner


@pytest.mark.parametrize("rows", [1, 4])
def test_a_step_gives_one_row_of_logits_per_sequence(runner, rows: int) -> None:
    logits = decode_step(runner, rows, context=20)()
    assert logits.shape == (rows, TINY["vocab_size"])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("rows", [1, 4])
def test_the_breakdown_finds_the_weight_products(runner, rows: int) -> None:
    forward = decode_step(runner, rows, context=20)
    forward()  # warm up, as the tool does before it profiles
    shares, calls = profile_shares(forward, steps=2)
    assert shares["weights"] > 0.0, shares
    assert shares["bmm"] > 0.0 and shares["attention rest"] > 0.0, shares
    assert sum(shares.values()) == pytest.approx(1.0)
    assert calls > 10 * TINY["num_hidden_layers"]  # every layer's ops were counted


def test_the_bandwidth_probe_reads_64_megabytes() -> None:
    read, nbytes = gemv_reader()
    assert nbytes == 64 << 20
    assert read() > 0.0
