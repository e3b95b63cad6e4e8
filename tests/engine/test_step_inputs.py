"""How a scheduled batch becomes the step's rows: one-token rows first, then prefill chunks;
slots and block tables from each sequence's blocks; only rows that end a sequence sample."""

from __future__ import annotations

from services.engine.scheduler import ScheduledBatch
from services.engine.step_inputs import pack_batch
from tests.engine.test_scheduler import seq


def test_rows_slots_tables_and_samplers():
    dec = seq(5, "dec")  # decoding: 5 tokens, 4 cached, blocks 7 and 2
    dec.num_computed, dec.block_table = 4, [7, 2]
    mid = seq(9, "mid")  # a one-token chunk in the middle of its prompt: no sample
    mid.num_computed, mid.block_table = 3, [5, 6, 8]
    pre = seq(6, "pre")  # a prefill chunk of tokens 2..5 after 2 cached ones: samples
    pre.num_computed, pre.block_table = 2, [4, 9]
    packed = pack_batch(ScheduledBatch(decodes=[dec, mid], prefills=[(pre, 4)]), block_size=4)

    assert packed.tokens == [5, 4, 3, 4, 5, 6]
    assert packed.positions == [4, 3, 2, 3, 4, 5]
    # slot = block * 4 + position % 4
    assert packed.slots == [2 * 4 + 0, 5 * 4 + 3, 4 * 4 + 2, 4 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1]
    assert packed.lens == [5, 4] and packed.blocks == 2
    assert packed.tables == [7, 2, 5, 6]  # each row's first 2 blocks
    assert packed.chunks == [(2, 4, 6, 2)] and packed.chunk_blocks == [4, 9]
    assert packed.sample_rows == [0, 5]
    assert [s.request_id for s in packed.samplers] == ["dec", "pre"]
    assert packed.num_decodes == 2 and not packed.decode_only
