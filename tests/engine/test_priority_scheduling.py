"""Admission by priority class (internal > pro > free), first come first served within a
class, aging against starvation, and preemption of the lowest class first."""

from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.params import SamplingParams
from services.engine.priority import Priority
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence
from services.engine.text import TextStream
from tests.engine.test_scheduler import advance

FREE, PRO, INTERNAL = Priority.FREE, Priority.PRO, Priority.INTERNAL


def seq(n: int, rid: str, priority: Priority, arrival: float) -> Sequence:
    """A request that arrived at `arrival` (set, not measured: the tests stay deterministic)."""
    s = Sequence(
        rid,
        list(range(1, n + 1)),
        SamplingParams(temperature=0),
        TextStream(None, []),
        None,
        priority=priority,
    )
    s.arrival = arrival
    return s


def admitted(sch: Scheduler) -> list[str]:
    return [s.request_id for s, _ in sch.schedule().prefills]


def test_higher_classes_are_admitted_first_and_fcfs_within_a_class():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=100)
    # arrival order: free f0, pro p0, free f1, internal i0, pro p1
    for s in (
        seq(3, "f0", FREE, 100.0),
        seq(3, "p0", PRO, 100.1),
        seq(3, "f1", FREE, 100.2),
        seq(3, "i0", INTERNAL, 100.3),
        seq(3, "p1", PRO, 100.4),
    ):
        sch.add(s)
    assert [s.request_id for s in sch.waiting] == ["i0", "p0", "p1", "f0", "f1"]
    assert admitted(sch) == ["i0", "p0", "p1"]
    assert [s.request_id for s in sch.waiting] == ["f0", "f1"]
    assert sch.waiting.requests[FREE] == 2 and sch.waiting.tokens[FREE] == 6
    assert sch.waiting.requests[PRO] == 0 and sch.waiting.total_tokens == 6


def test_a_free_request_that_waited_longer_than_the_aging_goes_before_new_pro_work():
    aging = 30.0
    sch = Scheduler(
        BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, priority_aging_s=aging
    )
    old_free = seq(3, "old-free", FREE, 1000.0)
    recent_pro = seq(3, "recent-pro", PRO, 1000.0 + aging - 1)  # free waited 29 s: pro first
    late_pro = seq(3, "late-pro", PRO, 1000.0 + aging + 1)  # free waited 31 s: free first
    for s in (late_pro, old_free, recent_pro):
        sch.add(s)
    assert admitted(sch) == ["recent-pro"]
    sch.remove(recent_pro)
    assert admitted(sch) == ["old-free"]
    sch.remove(old_free)
    assert admitted(sch) == ["late-pro"]


def test_aging_is_per_class_step_internal_over_free_needs_twice_the_wait():
    sch = Scheduler(
        BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, priority_aging_s=10.0
    )
    sch.add(seq(3, "free", FREE, 0.0))
    sch.add(seq(3, "internal", INTERNAL, 15.0))  # free waited 15 s < 2 * 10 s
    assert admitted(sch) == ["internal"]

    sch = Scheduler(
        BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, priority_aging_s=10.0
    )
    sch.add(seq(3, "free", FREE, 0.0))
    sch.add(seq(3, "internal", INTERNAL, 25.0))  # free waited 25 s > 2 * 10 s
    assert admitted(sch) == ["free"]


def test_out_of_blocks_preempts_the_lowest_class_even_when_it_is_older():
    bm = BlockManager(4, 2)  # 8 tokens of cache
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old_free, new_pro = seq(4, "old-free", FREE, 0.0), seq(3, "new-pro", PRO, 1.0)
    sch.add(old_free)
    sch.add(new_pro)
    first = sch.schedule()
    assert [s.request_id for s, _ in first.prefills] == ["new-pro", "old-free"]
    advance(first)  # old-free: 5 tokens (3 blocks next), new-pro: 4 tokens (2 blocks next)
    batch = sch.schedule()
    assert [s.request_id for s in batch.preempted] == ["old-free"]
    assert [s.request_id for s in batch.decodes] == ["new-pro"]
    assert old_free.num_computed == 0 and old_free.block_table == []
    assert list(sch.waiting) == [old_free] and sch.waiting.tokens[FREE] == 5


def test_aborting_a_waiting_request_takes_its_work_off_the_counts():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100)
    a, b = seq(5, "a", FREE, 0.0), seq(7, "b", FREE, 1.0)
    sch.add(a)
    sch.add(b)
    sch.remove(b)
    assert [s.request_id for s in sch.waiting] == ["a"]
    assert sch.waiting.requests[FREE] == 1 and sch.waiting.tokens[FREE] == 5
    assert admitted(sch) == ["a"]
    assert sch.waiting.total_requests == 0 and sch.waiting.total_tokens == 0


def test_a_full_batch_makes_room_for_a_higher_class_by_preempting_the_newest_free():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    older, newer = seq(3, "free-old", FREE, 10.0), seq(3, "free-new", FREE, 11.0)
    sch.add(older)
    sch.add(newer)
    advance(sch.schedule())
    pro = seq(3, "pro", PRO, 12.0)
    sch.add(pro)
    batch = sch.schedule()
    assert [s.request_id for s in batch.preempted] == ["free-new"]
    assert [s.request_id for s, _ in batch.prefills] == ["pro"]
    assert [s.request_id for s in batch.decodes] == ["free-old"]
    assert list(sch.waiting) == [newer] and newer.num_computed == 0
    # the pro request does not get displaced back, nor does free displace free
    advance(batch)
    batch = sch.schedule()
    assert not batch.preempted and sorted(s.request_id for s in batch.decodes) == [
        "free-old",
        "pro",
    ]


def test_no_preemption_within_a_class_or_against_a_long_waiter():
    # same class: a re-queued older free request waits for a slot instead of displacing
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100)
    running = seq(3, "running", FREE, 10.0)
    sch.add(running)
    advance(sch.schedule())
    sch.add(seq(3, "older-free", FREE, 5.0))
    assert not sch.schedule().preempted

    # a free request that has been in the engine longer than the aging is not displaced
    sch = Scheduler(
        BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, priority_aging_s=30.0
    )
    sch.add(seq(3, "long-free", FREE, 0.0))
    advance(sch.schedule())
    sch.add(seq(3, "pro", PRO, 31.0))
    batch = sch.schedule()
    assert not batch.preempted and [s.request_id for s in batch.decodes] == ["long-free"]
