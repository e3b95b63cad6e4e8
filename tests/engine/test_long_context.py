"""Long prompts are prefilled in chunks (YaRN RoPE) and decode; over-limit ones are refused.

The full 131,072-token run lives in benchmarks/long_context.py (time and peak memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model
from services.engine import Engine, InvalidRequest, SamplingParams
from tests.support.checkpoints import write_random_checkpoint

LONG = 6_000


@pytest.fixture(scope="module")
def yarn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("yarn-long"),
        seed=9,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_scaling={
            "type": "yarn",
            "factor": 8,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    )


def test_long_prompt_prefills_in_chunks_and_decodes(yarn_checkpoint: Path):
    engine = Engine.from_pretrained(yarn_checkpoint, max_num_batched_tokens=1024)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, engine.config.vocab_size, (LONG,), generator=g).tolist()
    steps = 0
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "long")
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
        steps += 1
    tokens = [t for d in deltas for t in d.token_ids]
    assert len(tokens) == 4 and deltas[-1].finish_reason == "length"
    assert steps == -(-LONG // 1024) + 3  # 6 prefill chunks, then 3 decode steps
    # the chunked prefill's first token equals a full causal pass over the whole prompt
    m = model.load_pretrained(yarn_checkpoint)
    with torch.inference_mode():
        logits = m(torch.tensor([prompt]))[0, -1]
    top2 = logits.topk(2).values
    if float(top2[0] - top2[1]) >= 1e-4:
        assert tokens[0] == int(logits.argmax())
    assert engine.metrics.cache_blocks_used == 0


def test_prompt_over_the_context_is_refused_without_using_blocks(yarn_checkpoint: Path):
    engine = Engine.from_pretrained(yarn_checkpoint)
    with pytest.raises(InvalidRequest, match="context is 8192 tokens"):
        engine.add_request([5] * 8193, SamplingParams(max_tokens=1))
    assert engine.metrics.cache_blocks_used == 0 and not engine.has_unfinished()
    # a prompt of exactly the context still gets its one token (a smaller cap keeps it quick)
    capped = Engine.from_pretrained(yarn_checkpoint, max_model_len=300)
    out = capped.generate([[5] * 300], SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1
    with pytest.raises(InvalidRequest, match="shorten the prompt by 1 tokens"):
        capped.add_request([5] * 301)
    assert capped.metrics.cache_blocks_used == 0
