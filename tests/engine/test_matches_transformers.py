"""Greedy outputs equal transformers' `generate` (the oracle) token for token, whatever the
batching: 20 requests of different lengths at once, with and without prefix caching, and
with a cache small enough to force preemption and recomputation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine import Engine, SamplingParams

NEW_TOKENS = 64
TIE = 1e-4  # where the oracle's two best logits are closer than this, either choice is right


def make_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(2, 512, (24,), generator=g).tolist()  # a common system prompt
    prompts = []
    for i in range(20):
        n = 1 + (i * 7) % 45
        own = torch.randint(2, 512, (n,), generator=g).tolist()
        prompts.append(shared + own if i % 2 else own)
    return prompts


@pytest.fixture(scope="module")
def reference(engine_checkpoint: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt, oracle tokens up to the first near-tie) per request."""
    from transformers import DeepseekV2ForCausalLM

    hf = DeepseekV2ForCausalLM.from_pretrained(engine_checkpoint, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    out = []
    with torch.inference_mode():
        for prompt in make_prompts():
            res = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens = res.sequences[0, len(prompt) :].tolist()
            upto = len(tokens)
            for k, logits in enumerate(res.logits):
                top2 = logits[0].float().topk(2).values
                if float(top2[0] - top2[1]) < TIE:
                    upto = k  # tokens before the tie must match
                    break
            out.append((prompt, tokens[:upto]))
    assert sum(len(t) for _, t in out) > 15 * NEW_TOKENS  # ties are rare, comparisons real
    return out


def check(engine: Engine, reference: list[tuple[list[int], list[int]]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate([p for p, _ in reference], params)
    for i, ((_, expected), out) in enumerate(zip(reference, outputs, strict=True)):
        assert out.finish_reason == "length"
        assert len(out.token_ids) == NEW_TOKENS
        assert out.token_ids[: len(expected)] == expected, f"request {i} diverged"
    m = engine.metrics
    assert m.cache_blocks_used == 0 and m.running == 0 and m.waiting == 0


def test_continuous_batching_without_prefix_cache(engine_checkpoint, reference):
    engine = Engine.from_pretrained(
        engine_checkpoint,
        block_size=16,
        max_num_seqs=32,
        max_num_batched_tokens=96,  # long prompts are chunked, decodes mix with prefills
        enable_prefix_caching=False,
    )
    check(engine, reference)
    assert engine.metrics.prefix_cache_hit_rate == 0.0


def test_prefix_cache_hits_change_nothing(engine_checkpoint, reference):
    engine = Engine.from_pretrained(
        engine_checkpoint, block_size=4, max_num_seqs=32, max_num_batched_tokens=64
    )
    check(engine, reference)
    first_hits = engine.metrics.cached_prompt_tokens
    assert first_hits > 0  # later requests reuse the shared system prompt
    check(engine, reference)  # again: now most prompts come from the cache
    assert engine.metrics.cached_prompt_tokens > first_hits + 200


def test_small_cache_forces_preemption_and_recompute(engine_checkpoint, reference):
    engine = Engine.from_pretrained(
        engine_checkpoint,
        block_size=4,
        cache_tokens=320,  # far less than 20 requests need together
        max_num_seqs=20,
        max_num_batched_tokens=64,
    )
    check(engine, reference)
    m = engine.metrics
    assert m.num_preemptions > 0 and m.recomputed_tokens > 0
