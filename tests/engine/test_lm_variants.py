"""DeepSeek-VL2's extra language models through the engine: greedy tokens equal the model's
plain full forward (itself within 1e-4 of the oracles, tests/model/test_lm_variants.py)
token for token, batched with chunked prefill, from the prefix cache, and with a cache small
enough to preempt; the MHA variant's captured decode step and its device placement too.

- ``noaux_tc``: VL2's sigmoid routing (MLA attention, the latent cache);
- ``mha``: VL2-Tiny's plain multi-head attention (keys and values in the paged cache),
  with grouped key/value heads so the cache holds fewer heads than the queries use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model as dsv2
from services.engine import Engine, SamplingParams
from tests.engine.test_matches_transformers import make_prompts
from tests.support.variant_checkpoints import write_mha_checkpoint, write_noaux_checkpoint

NEW_TOKENS = 32
TIE = 1e-4  # where the two best logits are closer than this, either choice is right

WRITERS = {
    "noaux_tc": lambda path: write_noaux_checkpoint(path, seed=5),
    "mha": lambda path: write_mha_checkpoint(path, seed=5, num_key_value_heads=2),
}


def plain_greedy(m: torch.nn.Module, prompts: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy tokens of the model's plain full forward up to the first near-tie)."""
    device = m.lm_head.weight.device
    reference = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                logits = m(torch.tensor([ids], device=device))[0, -1].float()  # no cache
                top2 = logits.topk(2)
                if float(top2.values[0] - top2.values[1]) < TIE:
                    break
                ids.append(int(top2.indices[0]))
            reference.append((prompt, ids[len(prompt) :]))
    assert sum(len(t) for _, t in reference) > 15 * NEW_TOKENS  # ties are rare
    return reference


@pytest.fixture(scope="module", params=list(WRITERS))
def variant(request, tmp_path_factory) -> tuple[Path, list[tuple[list[int], list[int]]]]:
    """(checkpoint, the plain forward's greedy continuations of make_prompts())."""
    path = WRITERS[request.param](tmp_path_factory.mktemp(request.param))
    return path, plain_greedy(dsv2.load_pretrained(path), make_prompts())


def check(engine: Engine, reference: list[tuple[list[int], list[int]]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate([p for p, _ in reference], params)
    for i, ((_, expected), out) in enumerate(zip(reference, outputs, strict=True)):
        assert len(out.token_ids) == NEW_TOKENS
        assert out.token_ids[: len(expected)] == expected, f"request {i} diverged"
    m = engine.metrics
    assert m.cache_blocks_used == 0 and m.running == 0 and m.waiting == 0


def test_batched_chunked_prefill_matches_the_plain_forward(variant):
    path, reference = variant
    engine = Engine.from_pretrained(
        path,
        block_size=16,
        max_num_seqs=32,
        max_num_batched_tokens=96,  # long prompts are chunked, decodes mix with prefills
        enable_prefix_caching=False,
    )
    check(engine, reference)


def test_prefix_cache_hits_change_nothing(variant):
    path, reference = variant
    engine = Engine.from_pretrained(path, block_size=4, max_num_seqs=32, max_num_batched_tokens=64)
    check(engine, reference)
    first_hits = engine.metrics.cached_prompt_tokens
    assert first_hits > 0  # later requests reuse the shared system prompt
    check(engine, reference)
    assert engine.metrics.cached_prompt_tokens > first_hits + 200


def test_small_cache_forces_preemption_and_recompute(variant):
    path, reference = variant
    engine = Engine.from_pretrained(
        path, block_size=4, cache_tokens=320, max_num_seqs=20, max_num_batched_tokens=64
    )
    check(engine, reference)
    m = engine.metrics
    assert m.num_preemptions > 0 and m.recomputed_tokens > 0


def test_cache_holds_keys_and_values_per_kv_head(variant):
    path, _ = variant
    engine = Engine.from_pretrained(path, block_size=4, cache_tokens=64)
    cfg = engine.config
    width = 2 * 2 * cfg.head_dim if not cfg.use_mla else cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert engine.runner.cache.shape == (cfg.num_hidden_layers, 16 + 1, 4, width)
    per_token = cfg.num_hidden_layers * width * 4  # float32
    assert engine.runner.bytes_per_token(cfg, torch.float32) == per_token


# The MHA variant's meta-device trap and captured decode step: tests/engine/test_device.py
# (parametrised over both attention kinds).
