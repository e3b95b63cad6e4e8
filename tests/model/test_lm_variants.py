"""DeepSeek-VL2's two extra language models against their oracles (fp32, tiny random configs):

- VL2 (``topk_method: noaux_tc``): logits within 1e-4 of transformers' DeepseekV3ForCausalLM;
- VL2-Tiny (``use_mla: false``): logits within 1e-4 of transformers' DeepseekV2ForCausalLM
  with LlamaAttention in every layer (see tests/support/variant_checkpoints.py for why that
  is the reference);

from input_ids and from inputs_embeds, plus the routing details the oracle cannot show and
the config errors that name the field to fix."""

from __future__ import annotations

import pytest
import torch

import model
from model.config import ConfigError, DeepseekV2Config
from model.moe import MoEGate
from tests.support.variant_checkpoints import (
    MHA_CONFIG,
    NOAUX_CONFIG,
    load_mha_oracle,
    load_noaux_oracle,
    write_mha_checkpoint,
    write_noaux_checkpoint,
)

VARIANTS = {
    "noaux_tc": (write_noaux_checkpoint, load_noaux_oracle, {}),
    # 4 dense-first layers, attention biases
    "noaux_tc_q_lora": (
        write_noaux_checkpoint,
        load_noaux_oracle,
        dict(q_lora_rank=48, num_hidden_layers=4, first_k_dense_replace=2),
    ),
    "mha": (write_mha_checkpoint, load_mha_oracle, {}),
    # grouped key/value heads (2 per 4 query heads) and q/k/v/o biases
    "mha_gqa_bias": (
        write_mha_checkpoint,
        load_mha_oracle,
        dict(num_key_value_heads=2, attention_bias=True),
    ),
}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(VARIANTS))
def test_logits_match_the_oracle(tmp_path, case):
    write, load_oracle, overrides = VARIANTS[case]
    path = write(tmp_path, seed=3, **overrides)
    ours = model.load_pretrained(path)
    ref = load_oracle(path)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        got, want = ours(ids), ref(ids, use_cache=False).logits
        assert got.shape == want.shape == (2, 40, ours.config.vocab_size)
        assert (got - want).abs().max().item() <= 1e-4
        assert want.std().item() > 0.1  # logits carry signal, the bound is not trivially met
        # the same through inputs_embeds (how image embeddings enter the language model)
        embeds = ours.model.embed_tokens(ids) + 0.05 * torch.randn(
            2, 40, ours.config.hidden_size, generator=torch.Generator().manual_seed(2)
        )
        got_e = ours(inputs_embeds=embeds)
        want_e = ref(inputs_embeds=embeds, use_cache=False).logits
        assert (got_e - want_e).abs().max().item() <= 1e-4
        assert (got_e - got).abs().max().item() > 1e-2  # the perturbed embeddings were used


def test_mha_rope_is_the_non_interleaved_one(tmp_path, monkeypatch):
    """Negative control: rotating adjacent pairs (MLA's RoPE) instead of halves breaks the
    match with the oracle, so the test above does check which RoPE is used."""
    import model.attention as attention
    from model.rope import apply_rotary

    path = write_mha_checkpoint(tmp_path, seed=3)
    ours, ref = model.load_pretrained(path), load_mha_oracle(path)
    monkeypatch.setattr(attention, "apply_rotary_halves", apply_rotary)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - ref(ids, use_cache=False).logits).abs().max().item() > 1e-2


def _gate(**overrides) -> MoEGate:
    config = DeepseekV2Config.from_dict({**NOAUX_CONFIG, **overrides})
    gate = MoEGate(config)
    with torch.no_grad():
        gate.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        gate.e_score_correction_bias.zero_()
    return gate


def test_noaux_tc_chooses_with_the_bias_and_weighs_without_it():
    gate = _gate()
    x = torch.randn(256, gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    scores = gate.scores(x)
    assert torch.all((scores > 0) & (scores < 1))  # sigmoid, not a softmax over experts
    unbiased_ids, _ = gate.select(scores)
    with torch.no_grad():  # a large bias on expert 5 pulls it into every choice
        gate.e_score_correction_bias[5] = 10.0
    ids, weights = gate.select(scores)
    assert (ids == 5).any(dim=-1).all()
    assert not (unbiased_ids == 5).any(dim=-1).all()
    # weights: the chosen experts' unbiased scores, normalised to 1, times 2.0
    chosen = scores.gather(1, ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 2.0)
    torch.testing.assert_close(weights.sum(-1), torch.full((256,), 2.0))


def test_noaux_tc_groups_rank_by_their_two_best_scores_and_drop_with_zero():
    """16 experts in 4 groups, 2 groups kept. The group holding the single best expert loses
    on its top-2 sum; experts of dropped groups count as 0.0 (DeepSeek's reference code, not
    -inf), so a kept group's experts whose biased score is negative lose to them."""
    scores = torch.tensor(
        [
            [
                *(0.90, 0.01, 0.01, 0.01),  # group 0: best single score, top-2 sum 0.91
                *(0.50, 0.48, 0.02, 0.02),  # group 1: top-2 sum 0.98
                *(0.47, 0.46, 0.03, 0.03),  # group 2: top-2 sum 0.93
                *(0.10, 0.10, 0.10, 0.10),  # group 3: 0.20
            ]
        ]
    )
    ids, _ = _gate().select(scores)  # top-4
    assert sorted(ids[0].tolist()) == [4, 5, 8, 9]  # groups 1 and 2, not group 0's 0.9

    wide = _gate(num_experts_per_tok=6)
    with torch.no_grad():  # the 3rd and 4th experts of groups 1 and 2 go below zero
        wide.e_score_correction_bias.copy_(torch.tensor([0.0] * 4 + [0, 0, -1, -1] * 2 + [0] * 4))
    ids, weights = wide.select(scores)
    picked = set(ids[0].tolist())
    assert {4, 5, 8, 9} <= picked
    rest = picked - {4, 5, 8, 9}
    assert len(rest) == 2 and not rest & {6, 7, 10, 11}  # -inf masking would pick these
    assert {e // 4 for e in rest} <= {0, 3}  # zero-filled experts of the dropped groups
    assert torch.all(weights > 0)  # their weights are their (positive) unbiased scores


def test_distributed_experts_give_the_same_noaux_output(tmp_path):
    """An expert shard path (routed experts split over executors) sees the same routing."""
    from model.moe import LocalExpertExecutor

    path = write_noaux_checkpoint(tmp_path, seed=4)
    whole = model.load_pretrained(path)
    head = model.load_pretrained(path, experts="none")
    shards = [model.load_routed_experts(path, 0, 7), model.load_routed_experts(path, 7, 16)]
    head.set_expert_executor(LocalExpertExecutor({i: [s[i] for s in shards] for i in shards[0]}))
    ids = _ids(whole.config.vocab_size)
    with torch.no_grad():
        assert (whole(ids) - head(ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(NOAUX_CONFIG, scoring_func="softmax"), "scoring_func"),
        (dict(NOAUX_CONFIG, n_group=3), "n_group"),
        (dict(NOAUX_CONFIG, n_group=16, topk_group=8), "n_group"),  # 1 expert per group
        (dict(NOAUX_CONFIG, topk_group=5), "topk_group"),
        (dict(NOAUX_CONFIG, topk_method="noaux"), "topk_method"),
        (dict(MHA_CONFIG, num_attention_heads=5), "num_attention_heads"),
        (dict(MHA_CONFIG, num_key_value_heads=3), "num_key_value_heads"),
        (dict(MHA_CONFIG, hidden_size=72, num_attention_heads=8), "hidden_size"),  # head 9
        (dict(MHA_CONFIG, rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    ],
)
def test_bad_variant_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        DeepseekV2Config.from_dict(overrides)


def test_cache_width_follows_the_attention_kind():
    mla = DeepseekV2Config.from_dict(NOAUX_CONFIG)
    assert mla.cache_dim == mla.kv_lora_rank + mla.qk_rope_head_dim == 40
    mha = DeepseekV2Config.from_dict(dict(MHA_CONFIG, num_key_value_heads=2))
    assert mha.head_dim == 16 and mha.cache_dim == 2 * 2 * 16
    # VL2-Tiny's published shape: 10 heads x 128 over hidden 1280
    tiny = DeepseekV2Config.from_dict(
        dict(MHA_CONFIG, hidden_size=1280, num_attention_heads=10, num_key_value_heads=10)
    )
    assert tiny.head_dim == 128 and tiny.cache_dim == 2560


@pytest.mark.parametrize(
    "values",
    [NOAUX_CONFIG, MHA_CONFIG, dict(MHA_CONFIG, num_key_value_heads=2, attention_bias=True)],
)
def test_parameter_accounting_counts_the_variants(values):
    """model.accounting (capacity planning) counts exactly the parameters the model holds:
    MHA's q/k/v/o (and biases), noaux_tc's correction bias; the cache per token follows
    the attention kind."""
    from model.accounting import (
        kv_cache_bytes_per_token,
        kv_cache_reduction,
        param_counts,
    )

    config = DeepseekV2Config.from_dict(values)
    with torch.device("meta"):
        m = model.DeepseekV2ForCausalLM(config)
    assert param_counts(config).total == sum(p.numel() for p in m.parameters())
    width = 2 * config.num_key_value_heads * config.head_dim if not config.use_mla else 40
    assert kv_cache_bytes_per_token(config, "bfloat16") == config.num_hidden_layers * width * 2
    if not config.use_mla:
        assert kv_cache_reduction(config) == 0.0  # nothing saved: it is the MHA cache
