"""The captured decode step: static buffers, padded batch sizes and block counts.

CUDA graphs need a GPU; what they replay is ``CapturedDecode``'s static-buffer step, and on
the CPU that step runs as is (``eager``). So the padding and bucketing logic is checked
here: the same greedy tokens as the plain step, padding rows touching only the dummy block.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model as dsv2
from services.engine import Engine, EngineOptions, SamplingParams
from services.engine.graphs import CapturedDecode, batch_buckets, can_capture
from tests.engine.test_matches_transformers import make_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _engine(path: Path, **options) -> Engine:
    return Engine(dsv2.load_pretrained(path), None, EngineOptions(**options))


def _capture(engine: Engine, max_batch_size: int) -> CapturedDecode:
    runner = engine.runner
    runner.captured = CapturedDecode(runner, max_batch_size, engine.max_model_len)
    return runner.captured


def test_bucket_sizes():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1]


def test_bucketing_pads_batch_and_blocks(engine_checkpoint: Path):
    engine = _engine(engine_checkpoint, block_size=4, max_num_seqs=20, max_model_len=100)
    captured = _capture(engine, 20)
    assert captured.max_blocks == 25
    assert captured.bucket(1, 1) == (1, 1)
    assert captured.bucket(3, 5) == (4, 8)
    assert captured.bucket(17, 20) == (20, 25)  # block count capped at the context
    assert captured.fits(20, 25) and not captured.fits(21, 1) and not captured.fits(1, 26)


def test_captured_steps_give_the_plain_steps_tokens(engine_checkpoint: Path):
    prompts = make_prompts()
    options = dict(block_size=4, max_num_seqs=20, max_num_batched_tokens=64)
    want = [o.token_ids for o in _engine(engine_checkpoint, **options).generate(prompts, GREEDY)]
    engine = _engine(engine_checkpoint, **options)
    captured = _capture(engine, 20)
    calls = []
    run = captured.run
    captured.run = lambda packed: calls.append(packed.num_decodes) or run(packed)
    got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert got == want
    # decode-only steps went through the static buffers, at several padded sizes
    assert len(calls) > 10 and len(set(calls)) > 3
    assert captured.num_captured >= 3
    assert engine.metrics.cache_blocks_used == 0


def test_padding_rows_write_only_the_dummy_block(engine_checkpoint: Path):
    engine = _engine(engine_checkpoint, block_size=4, max_num_seqs=8, enable_prefix_caching=False)
    captured = _capture(engine, 8)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [2] * 9]  # 3 rows: padded to 4
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()  # prefill (eager)
    seqs = list(engine.seqs.values())
    owned = {b for s in seqs for b in s.block_table}
    before = engine.runner.cache.clone()
    engine.step()  # decode of 3 rows through the captured step, bucket 4
    assert captured.num_captured == 1
    changed = (engine.runner.cache != before).flatten(2).any(-1).any(0)  # [blocks]
    changed_blocks = set(torch.nonzero(changed).flatten().tolist())
    assert changed_blocks <= owned | {engine.runner.dummy_block}
    assert engine.runner.dummy_block in changed_blocks  # the padding row wrote there


def test_remote_experts_are_not_captured(engine_checkpoint: Path):
    m = dsv2.load_pretrained(engine_checkpoint)
    assert can_capture(m)
    m.set_expert_executor(dsv2.LocalExpertExecutor({}))
    assert not can_capture(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_step_reads_nothing_back_to_the_host(engine_checkpoint: Path, dtype, monkeypatch):
    """CUDA graph capture fails on any device -> host read (.item(), .tolist(), a size that
    depends on values). Without a GPU the same is checked by tracing the static-buffer step
    with TorchDynamo in fullgraph mode (no compiler behind it): such a read cannot be traced
    and raises. The routed experts take their accelerator (sync-free) path, as on CUDA; in
    float32 its padded form (torch's tracer only knows the grouped matmul in bf16)."""
    import model.moe as moe

    if dtype == torch.float32:
        monkeypatch.setattr(moe, "_grouped_mm_supported", lambda x: False)
    elif moe._GROUPED_MM is None:
        pytest.skip("this torch has no torch._grouped_mm")
    prompts = make_prompts()[:6]
    plain = Engine(dsv2.load_pretrained(engine_checkpoint, dtype=dtype), None, EngineOptions())
    want = [o.token_ids for o in plain.generate(prompts, GREEDY)]

    m = dsv2.load_pretrained(engine_checkpoint, dtype=dtype)
    for layer in m.moe_layers():
        layer.experts.sync_free = True
    engine = Engine(m, None, EngineOptions(block_size=4, max_num_seqs=8, prepack_weights=False))
    runner = engine.runner
    runner.captured = CapturedDecode(
        runner,
        8,
        engine.max_model_len,
        lambda fn: torch.compile(fn, fullgraph=True, backend="eager", dynamic=False),
    )
    try:
        got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    finally:
        torch._dynamo.reset()  # drop the traced graphs
    assert runner.captured.num_captured >= 2
    if dtype == torch.float32:
        assert got == want
    else:  # bf16: another summation order may take the other side of a near-tie
        assert sum(a[:3] == b[:3] for a, b in zip(got, want, strict=True)) >= 4
