"""Every tensor the engine makes is on the engine's device.

No GPU here, so placement is checked the other way round: the engine runs on the CPU with
``torch.set_default_device("meta")`` active. A tensor created anywhere in a step without the
engine's device lands on the meta device, and mixing it with the CPU tensors (or reading it
back) raises, so the run below fails on the first such tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model as dsv2
from services.engine import Engine, EngineOptions, SamplingParams
from tests.engine.test_matches_transformers import make_prompts
from tests.support.variant_checkpoints import write_mha_checkpoint


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=24)
    params = [sampled if i % 3 == 0 else greedy for i in range(len(prompts))]
    return [o.token_ids for o in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def mha_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VL2-Tiny's attention kind (``use_mla: false``, grouped key/value heads): its per-head
    paged cache goes through the same trap as MLA's latent one."""
    return write_mha_checkpoint(tmp_path_factory.mktemp("mha-dev"), seed=6, num_key_value_heads=2)


@pytest.fixture(params=["mla", "mha"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(
        "engine_checkpoint" if request.param == "mla" else "mha_checkpoint"
    )


def test_engine_creates_no_tensor_off_its_device(checkpoint: Path):
    prompts = make_prompts()
    # prefix caching (block 4: the shared system prompt's blocks are reused), chunked
    # prefill mixed with decodes, and a cache small enough to preempt
    options = dict(block_size=4, cache_tokens=320, max_num_seqs=20, max_num_batched_tokens=64)
    want = _run(Engine(dsv2.load_pretrained(checkpoint), None, EngineOptions(**options)), prompts)

    m = dsv2.load_pretrained(checkpoint)  # loaded on the CPU before the trap is set
    torch.set_default_device("meta")
    try:
        engine = Engine(m, None, EngineOptions(**options))
        assert engine.device == torch.device("cpu")
        got = _run(engine, prompts)
        again = _run(engine, prompts)  # now the prompts come from the prefix cache
    finally:
        torch.set_default_device(None)
    assert engine.runner.cache.device == torch.device("cpu")
    metrics = engine.metrics
    assert metrics.num_preemptions > 0 and metrics.cached_prompt_tokens > 0
    assert got == want and again == want


def test_captured_step_buffers_live_on_the_engine_device(checkpoint: Path):
    from services.engine.graphs import CapturedDecode

    prompts = make_prompts()[:8]
    options = dict(block_size=4, max_num_seqs=8)
    want = _run(Engine(dsv2.load_pretrained(checkpoint), None, EngineOptions(**options)), prompts)
    m = dsv2.load_pretrained(checkpoint)
    torch.set_default_device("meta")
    try:
        engine = Engine(m, None, EngineOptions(**options))
        engine.runner.captured = CapturedDecode(engine.runner, 8, engine.max_model_len)
        got = _run(engine, prompts)
    finally:
        torch.set_default_device(None)
    assert engine.runner.captured.num_captured > 0
    assert got == want
