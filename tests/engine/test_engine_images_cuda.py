"""On a CUDA device: pictures through the engine with CUDA graphs on (prefill steps with image
rows run eagerly on inputs_embeds, decode steps replay captured graphs), against the plain
full forward on the same device (float32, TF32 off); and a bfloat16 run whose second round
takes every picture from the caches. Skipped without CUDA (test_engine_images.py runs the
same steps on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model as dsv2
from services.engine import Engine
from tests.engine.test_engine_images import GREEDY, requests
from tests.engine.vl2_support import full_forward_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_images_with_cuda_graphs_match_the_full_forward(vl2_checkpoint: Path, no_tf32):
    oracle = dsv2.load_pretrained(vl2_checkpoint, device="cuda")
    reqs = requests(oracle)
    want = [full_forward_greedy(oracle, ids, spans, GREEDY.max_tokens) for ids, spans in reqs]
    engine = Engine.from_pretrained(
        vl2_checkpoint, device="cuda", dtype="float32", block_size=4, max_num_batched_tokens=16
    )
    out = engine.generate(
        [ids for ids, _ in reqs], GREEDY, images=[spans or None for _, spans in reqs]
    )
    assert [o.token_ids for o in out] == want
    assert engine.runner.images_embedded == 5
    captured = engine.runner.captured
    assert captured is not None and captured.num_captured > 0


def test_bfloat16_images_come_from_the_caches_the_second_time(vl2_checkpoint: Path):
    engine = Engine.from_pretrained(
        vl2_checkpoint, device="cuda", dtype="bfloat16", block_size=4, max_num_batched_tokens=16
    )
    reqs = requests(engine.model)
    images = [spans or None for _, spans in reqs]
    first = engine.generate([ids for ids, _ in reqs], GREEDY, images=images)
    again = engine.generate([ids for ids, _ in reqs], GREEDY, images=images)
    # bfloat16 rounds differently by chunk shape: lengths, not tokens, are compared
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in first + again)
    assert engine.runner.images_embedded == 5  # none the second time
    assert all(o.cached_prompt_tokens > 0 for o in again)
    assert engine.runner.image_cache.bytes > 0
