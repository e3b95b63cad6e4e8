"""Continuous batching decisions: token budget, chunked prefill, caps, FIFO, preemption."""

from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.params import SamplingParams
from services.engine.scheduler import ScheduledBatch, Scheduler
from services.engine.sequence import Sequence
from services.engine.text import TextStream


def seq(n: int, rid: str) -> Sequence:
    return Sequence(
        rid, list(range(1, n + 1)), SamplingParams(temperature=0), TextStream(None, []), None
    )


def advance(batch: ScheduledBatch) -> None:
    """What the engine does after a forward: mark tokens computed, append a sampled token."""
    for s, n in [(s, 1) for s in batch.decodes] + batch.prefills:
        s.num_computed += n
        if s.num_computed == len(s.token_ids):
            s.token_ids.append(7)


def test_chunked_prefill_respects_the_token_budget():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(25, "a"), seq(3, "b")
    sch.add(a)
    sch.add(b)
    first = sch.schedule()
    assert [(s.request_id, n) for s, n in first.prefills] == [("a", 10)]
    advance(first)
    second = sch.schedule()
    assert [(s.request_id, n) for s, n in second.prefills] == [("a", 10)]
    advance(second)
    third = sch.schedule()  # a's last 5 tokens, then b's 3 fit the same step
    assert [(s.request_id, n) for s, n in third.prefills] == [("a", 5), ("b", 3)]
    assert third.num_tokens == 8
    advance(third)
    fourth = sch.schedule()  # both decode now: one token each
    assert [s.request_id for s in fourth.decodes] == ["a", "b"] and not fourth.prefills


def test_max_num_seqs_caps_running_and_admission_is_fifo():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(3, f"s{i}") for i in range(4)]
    for s in seqs:
        sch.add(s)
    batch = sch.schedule()
    assert [s.request_id for s, _ in batch.prefills] == ["s0", "s1"]
    assert [s.request_id for s in sch.waiting] == ["s2", "s3"]
    sch.remove(seqs[0])
    advance(batch)
    batch = sch.schedule()
    assert [s.request_id for s in batch.decodes] == ["s1"]
    assert [s.request_id for s, _ in batch.prefills] == ["s2"]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    bm = BlockManager(4, 2)  # 8 tokens of cache
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = seq(4, "old"), seq(3, "new")
    sch.add(old)
    sch.add(new)
    advance(sch.schedule())  # old: 5 tokens (3 blocks needed next), new: 4 tokens (2 blocks)
    batch = sch.schedule()
    assert [s.request_id for s in batch.preempted] == ["new"]
    assert [s.request_id for s in batch.decodes] == ["old"]
    assert new.num_computed == 0 and new.block_table == [] and sch.waiting[0] is new
    assert sch.recomputed_tokens == 3 and sch.num_preemptions == 1
    # once old finishes, new is recomputed from its prompt + generated token
    sch.remove(old)
    batch = sch.schedule()
    assert [(s.request_id, n) for s, n in batch.prefills] == [("new", 4)]
    assert bm.num_used_blocks == 2


def test_a_sequence_bigger_than_the_whole_cache_is_rejected_not_looped():
    sch = Scheduler(BlockManager(2, 2), max_num_seqs=4, max_num_batched_tokens=100)
    huge = seq(9, "huge")
    sch.add(huge)
    batch = sch.schedule()
    assert batch.rejected == [huge] and batch.empty
