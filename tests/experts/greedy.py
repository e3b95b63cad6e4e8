"""Greedy outputs of two engines compared as the engine issue does: up to ties.

Where the in-process model's two best logits differ by less than 1e-4, another choice is a
tie, not a failure: the sequences are compared up to there.
"""

from __future__ import annotations

import torch

TIE_MARGIN = 1e-4

# Mixed requests: different prompt lengths (one spans several blocks) and output lengths.
MIXED_PROMPTS: list[list[int]] = [
    [5, 17, 42],
    list(range(100, 140)),
    [7] * 3 + [300, 301, 302, 303, 8, 9],
    [int(x) for x in torch.randint(2, 500, (70,), generator=torch.Generator().manual_seed(1))],
    [11, 250],
    list(range(2, 26)),
]
MIXED_MAX_TOKENS = [12, 8, 20, 6, 16, 10]


def first_tie(model: torch.nn.Module, prompt: list[int], output: list[int]) -> int:
    """Index of the first generated token whose choice was a near tie (len(output) if none)."""
    if not output:
        return 0
    ids = torch.tensor([prompt + output[:-1]])
    with torch.inference_mode():
        logits = model(ids)[0, len(prompt) - 1 :].float()  # [len(output), V]
    top2 = logits.topk(2, dim=-1).values
    close = ((top2[:, 0] - top2[:, 1]) < TIE_MARGIN).nonzero().flatten()
    return int(close[0]) if len(close) else len(output)


def assert_same_up_to_ties(
    model: torch.nn.Module,
    prompts: list[list[int]],
    expected: list[list[int]],
    actual: list[list[int]],
) -> None:
    for i, (prompt, want, got) in enumerate(zip(prompts, expected, actual, strict=True)):
        upto = first_tie(model, prompt, want)
        if upto == len(want):
            assert got == want, f"request {i}: {got} != {want}"
        else:  # the choice at `upto` was a tie: only the tokens before it must agree
            assert got[:upto] == want[:upto], f"request {i} differs before a tie at {upto}"
