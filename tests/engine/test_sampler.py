"""Sampling: greedy, top-k/top-p narrowing, and per-request seeds independent of the batch."""

from __future__ import annotations

import torch

from services.engine.params import SamplingParams
from services.engine.sampler import greedy, sample
from services.engine.sequence import Sequence
from services.engine.text import TextStream


def seq(**kw) -> Sequence:
    return Sequence("r", [1], SamplingParams(**kw), TextStream(None, []), None)


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample(logits, [seq(temperature=0), seq(temperature=0)]) == [1, 0]


def test_top_k_1_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g)
    best = int(logits.argmax())
    for _ in range(20):
        assert sample(logits, [seq(temperature=1.0, top_k=1)]) == [best]
        assert sample(logits, [seq(temperature=1.0, top_p=1e-6)]) == [best]


def test_seeded_request_is_reproducible_whatever_shares_the_batch():
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(2, 64, generator=g) for _ in range(30)]
    alone = seq(temperature=0.9, top_p=0.95, seed=42)
    a = [sample(step[:1], [alone])[0] for step in steps]
    # same request, same logits, now sharing every step with other sampling requests
    crowded = seq(temperature=0.9, top_p=0.95, seed=42)
    noisy, greedy = seq(temperature=1.3, seed=7), seq(temperature=0)
    b = [sample(torch.stack([s[1], s[0], s[1]]), [noisy, crowded, greedy])[1] for s in steps]
    assert a == b
    assert len(set(a)) > 3  # actually sampling, not greedy


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = seq(temperature=1.0, seed=3)
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[sample(logits, [s])[0]] += 1
    assert 0.65 < counts[0] / 2000 < 0.75 and 0.07 < counts[2] / 2000 < 0.13


def test_greedy_picks_what_torchs_argmax_picks_on_every_path():
    """The C++ greedy pass (where built) and torch agree on ties (the first maximum), NaN
    (reported as the maximum, as torch does), -inf rows, bf16, and a row-strided view."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 32000, generator=g)
    logits[1, [7, 31999]] = logits[1].max() + 1  # a tie: the first one wins
    logits[2, 12345] = float("nan")
    logits[3, :] = float("-inf")
    logits[4, 0] = logits[4].max() + 1  # the very first element
    for x in (logits, logits.bfloat16(), logits[::2]):
        want = x.max(dim=-1).indices.tolist()
        assert greedy(x) == want
        assert sample(x, [seq(temperature=0)] * x.shape[0]) == want
