"""On a CUDA device: both DeepSeek-VL2 language-model variants through the engine with CUDA
graphs on (decode steps replayed from captured graphs, over MLA's latent rows or MHA's keys
and values) and off, against the plain forward on the same device (float32, token for token
up to near-ties); and a bfloat16 run with graphs that must finish with captured steps.
Skipped without CUDA (the same steps run on the CPU in test_lm_variants.py, the captured
step there eagerly)."""

from __future__ import annotations

import pytest
import torch

import model as dsv2
from services.engine import Engine
from tests.engine.test_lm_variants import NEW_TOKENS, WRITERS, check, plain_greedy
from tests.engine.test_matches_transformers import make_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("variant", list(WRITERS))
def test_cuda_graphs_match_the_plain_forward(tmp_path, variant):
    path = WRITERS[variant](tmp_path)
    reference = plain_greedy(dsv2.load_pretrained(path, device="cuda"), make_prompts())
    for graphs in (True, False):
        engine = Engine.from_pretrained(
            path,
            device="cuda",
            dtype="float32",
            block_size=16,
            max_num_seqs=32,
            max_num_batched_tokens=96,
            cuda_graphs=graphs,
        )
        assert engine.runner.cache.device.type == "cuda"
        check(engine, reference)
        captured = engine.runner.captured
        assert (captured is not None and captured.num_captured > 0) == graphs


@pytest.mark.parametrize("variant", list(WRITERS))
def test_bfloat16_with_graphs_runs_prefix_cache_and_preemption(tmp_path, variant):
    path = WRITERS[variant](tmp_path)
    engine = Engine.from_pretrained(
        path,
        device="cuda",
        dtype="bfloat16",
        block_size=4,
        cache_tokens=320,
        max_num_seqs=20,
        max_num_batched_tokens=64,
    )
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for _ in range(2):  # the second round reads prompts from the prefix cache
        outs = engine.generate(make_prompts(), params)
        assert all(len(o.token_ids) == NEW_TOKENS for o in outs)
    m = engine.metrics
    assert engine.runner.captured is not None and engine.runner.captured.num_captured > 0
    assert m.num_preemptions > 0 and m.cached_prompt_tokens > 0
