"""Our logits against transformers' own DeepseekV2ForCausalLM on random tiny checkpoints
written by its save_pretrained (fp32): max |difference| <= 1e-4 across the config space the
published models use, and the same greedy continuation as its generate()."""

from __future__ import annotations

import pytest
import torch

import model
from model.decode import greedy_generate
from tests.model.conftest import load_oracle
from tests.support.checkpoints import write_random_checkpoint

YARN_40 = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 16,  # small, so test positions exceed it
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

CASES = {
    # DeepSeek-V2-Lite-like: greedy routing, no q compression.
    "greedy_no_q_lora": dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None),
    # DeepSeek-V2 (236B)-like: 8 groups, 3 kept, weights x16, q compressed.
    "group_limited_v2": dict(
        topk_method="group_limited_greedy",
        n_routed_experts=32,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        routed_scaling_factor=16.0,
        n_shared_experts=2,
        q_lora_rank=48,
    ),
    # YaRN as published (factor 40, mscale = mscale_all_dim = 0.707), two dense layers.
    "yarn40_two_dense": dict(
        rope_scaling=YARN_40,
        max_position_embeddings=640,
        num_hidden_layers=4,
        first_k_dense_replace=2,
    ),
    # Plain RoPE, no YaRN block at all.
    "plain_rope": dict(rope_scaling=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    path = write_random_checkpoint(tmp_path, seed=3, **CASES[case])
    ours = model.load_pretrained(path)
    ref = load_oracle(path)
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        got, want = ours(ids), ref(ids).logits
    assert got.shape == want.shape == (2, 40, ours.config.vocab_size)
    assert (got - want).abs().max().item() <= 1e-4
    assert want.std().item() > 0.1  # logits carry signal, the bound is not trivially met


def test_group_limited_routing_is_exercised(tmp_path):
    """The group-limited case really restricts choices: plain top-k would differ."""
    path = write_random_checkpoint(tmp_path, seed=3, **CASES["group_limited_v2"])
    m = model.load_pretrained(path)
    moe = m.moe_layers()[0]
    x = torch.randn(64, m.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids, weights = moe.route(x)
    scores = moe.gate.scores(x)
    plain = scores.topk(6, dim=-1).indices
    assert not torch.equal(ids.sort(-1).values, plain.sort(-1).values)
    groups = ids // 4  # 32 experts in 8 groups of 4
    assert all(len(set(row.tolist())) <= 3 for row in groups)
    # weights are the chosen softmax scores times routed_scaling_factor 16
    torch.testing.assert_close(weights, scores.gather(1, ids) * 16.0)


def test_greedy_continuation_matches_generate(tiny_checkpoint):
    ours = model.load_pretrained(tiny_checkpoint)
    ref = load_oracle(tiny_checkpoint)
    prompt = [0, 17, 240, 33, 95, 402, 7, 300]
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=1,
        )[0, len(prompt) :].tolist()
    assert len(want) == 32
    # Full recompute each step (the plain forward) and the absorbed latent-cache path.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(prompt) :] == want
    assert greedy_generate(ours, prompt, 32) == want
