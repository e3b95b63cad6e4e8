"""Next-token choice per request: greedy rows in one argmax, the rest one by one with their
own torch.Generator, so a seeded request samples the same tokens whatever shares its batch."""

from __future__ import annotations

import torch

from model.kernels import ext_for
from services.engine.sequence import Sequence


def greedy(logits: torch.Tensor) -> list[int]:
    """logits [N, V] -> each row's first maximal index, as argmax gives it."""
    ext = ext_for(logits) if logits.dim() == 2 and logits.stride(-1) == 1 else None
    if ext is not None:  # one plain pass a row: torch's reduction cost ~5x more on the CPU
        return ext.argmax_rows(logits)
    # max(dim).indices: the first maximal index like argmax, about 2x faster on CPU
    return logits.max(dim=-1).indices.tolist()


def _sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    # on the host: a request's generator is a CPU one, so a seed draws the same tokens
    # whichever device computed the logits
    logits = logits.float().cpu() / p.temperature  # [V]
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (cum - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=seq.generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [N, V] (any float dtype) for seqs (same order) -> one token id per sequence."""
    if all(s.params.greedy for s in seqs):
        return greedy(logits)
    out = [0] * len(seqs)
    rows = [i for i, s in enumerate(seqs) if s.params.greedy]
    if rows:
        for i, t in zip(rows, greedy(logits[rows]), strict=True):
            out[i] = t
    for i, s in enumerate(seqs):
        if not s.params.greedy:
            out[i] = _sample_row(logits[i], s)
    return out
