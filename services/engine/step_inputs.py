"""A scheduled batch as the host-side lists one forward step needs (no tensors yet).

Rows are packed in the order attention expects them (``model.step``): one-token rows first
(decodes, and one-token prompt chunks), then each prefill chunk's tokens. The runner turns
these lists into device tensors in one copy; captured decode steps copy them into their
static buffers. Rows at image positions are listed (``image_rows``): the runner fills them
with the images' embedding rows instead of token embeddings. No tensor is made here, so it
is cheap and plain to test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.images import ImageRows, image_rows
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence


@dataclass
class PackedBatch:
    tokens: list[int] = field(default_factory=list)  # [T] token id of each row
    positions: list[int] = field(default_factory=list)  # [T]
    slots: list[int] = field(default_factory=list)  # [T] cache slot each row writes
    # one-token rows: context length (cached tokens after the step) and their first
    # `blocks` context blocks each, row-major [B * blocks], padded with block 0 (masked)
    lens: list[int] = field(default_factory=list)  # [B]
    blocks: int = 0
    tables: list[int] = field(default_factory=list)
    # prefill chunks: (first row, tokens, context length, number of its blocks in
    # chunk_blocks, in order)
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)
    chunk_blocks: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # rows that pick a next token
    samplers: list[Sequence] = field(default_factory=list)  # their sequences, same order
    image_rows: list[ImageRows] = field(default_factory=list)  # rows that take image embeddings

    @property
    def num_decodes(self) -> int:
        return len(self.lens)

    @property
    def decode_only(self) -> bool:
        return not self.chunks


def pack_batch(batch: ScheduledBatch, block_size: int) -> PackedBatch:
    bs = block_size
    out = PackedBatch()
    for s in batch.decodes:
        p = s.num_computed
        if s.images and p < s.prompt_len:
            out.image_rows.extend(image_rows(s, len(out.tokens), p, p + 1))
        out.tokens.append(s.token_ids[p])
        out.positions.append(p)
        out.slots.append(s.block_table[p // bs] * bs + p % bs)
        out.lens.append(p + 1)
        # a one-token chunk may be the middle of a prompt (budget ran out): no sample then
        if p + 1 == len(s.token_ids):
            out.sample_rows.append(len(out.tokens) - 1)
            out.samplers.append(s)
    if out.lens:
        out.blocks = nb = -(-max(out.lens) // bs)
        for s in batch.decodes:
            row = s.block_table[:nb]
            out.tables.extend(row + [0] * (nb - len(row)))
    for s, n in batch.prefills:
        start, end = s.num_computed, s.num_computed + n
        table = s.block_table
        first = len(out.tokens)
        if s.images and start < s.prompt_len:
            out.image_rows.extend(image_rows(s, first, start, end))
        out.tokens.extend(s.token_ids[start:end])
        out.positions.extend(range(start, end))
        out.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        blocks = table[: -(-end // bs)]
        out.chunks.append((first, n, end, len(blocks)))
        out.chunk_blocks.extend(blocks)
        if end == len(s.token_ids):
            out.sample_rows.append(first + n - 1)
            out.samplers.append(s)
    return out
