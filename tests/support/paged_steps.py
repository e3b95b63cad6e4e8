"""Engine-style steps for model tests: a packed batch over a paged latent cache, decode rows
first, then prefill chunks, with the metadata ``ModelRunner.prepare`` gives the model (slots,
decode rows' block tables, context lengths and mask, prefill chunks with their blocks)."""

from __future__ import annotations

import torch
from torch import Tensor

from model.step import PrefillChunk, StepMetadata


def paged_step(
    tables: list[list[int]],
    rows: list[tuple[int, int, int]],
    block_size: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, StepMetadata]:
    """rows: (seq, start, end) per part, decode parts (end = start + 1) first; sequence s
    keeps position p in block tables[s][p // block_size] -> positions [T] of the packed rows
    and the step's metadata (every row sampled)."""
    positions, slots, chunks = [], [], []
    decodes = [(s, a, b) for s, a, b in rows if b - a == 1]
    for s, a, b in rows:
        for p in range(a, b):
            positions.append(p)
            slots.append(tables[s][p // block_size] * block_size + p % block_size)
    row = len(decodes)
    for s, a, b in rows[len(decodes) :]:
        blocks = torch.tensor(tables[s][: -(-b // block_size)])
        chunks.append(PrefillChunk(row, b - a, b, blocks))
        row += b - a
    step = StepMetadata(
        slot_mapping=torch.tensor(slots),
        max_position=max(positions),
        num_decodes=len(decodes),
        prefills=chunks,
    )
    if decodes:
        lens = [b for _, _, b in decodes]  # each decode row's context, itself included
        nb = -(-max(lens) // block_size)
        step.block_tables = torch.tensor(
            [tables[s][:nb] + [0] * (nb - len(tables[s][:nb])) for s, _, _ in decodes]
        )
        step.decode_lens = torch.tensor(lens)
        past = torch.arange(nb * block_size)[None, :] >= step.decode_lens[:, None]
        step.decode_bias = torch.zeros(len(lens), 1, nb * block_size, dtype=dtype).masked_fill_(
            past[:, None], float("-inf")
        )
    return torch.tensor(positions), step
