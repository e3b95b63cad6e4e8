"""Continuous batching: which tokens of which sequences run in the next step.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, oldest
first: a decoding sequence takes one token, a sequence still in prefill takes the next chunk
of its prompt. Then waiting sequences are admitted by priority class, first come first
served within one, aged so that nothing starves (wait_queue.py; the first in that order that
does not fit blocks those behind it) while budget, blocks and the max_num_seqs cap allow.
Running sequences are visited highest class first, oldest first within one; the last of that
order (lowest class, newest) is preempted when blocks run out, or when every slot is taken and
a request of a higher class waits (so paid work does not wait for free work to finish). A
preempted sequence's blocks are freed and it goes back to the queue, at its original arrival,
to be recomputed later (its full blocks often survive in the prefix cache, which makes the
recompute cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.sequence import SeqStatus, Sequence
from services.engine.wait_queue import WaitQueue


@dataclass
class ScheduledBatch:
    """Sequences and how many tokens each computes this step; single-token ones first."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # sequences that cannot fit the cache even alone (finished with "length")
    rejected: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        priority_aging_s: float = 30.0,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = WaitQueue(priority_aging_s)
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.recomputed_tokens = 0  # tokens computed a second time because of preemption

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        self.recomputed_tokens += seq.num_computed
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.push(seq)
        self.num_preemptions += 1

    def _preempt_for_priority(self, batch: ScheduledBatch) -> None:
        """When every slot is taken and the next waiting request is of a higher class than
        the last running one and would have been admitted before it (aging counts: a free
        request that has waited long enough is not displaced by newer paid work), preempt
        that one. Never within a class, so two requests cannot displace each other in turn.
        One per step: steps are short, and each preemption costs a recompute."""
        if not self.waiting or not self.running or len(self.running) < self.max_num_seqs:
            return
        head, victim = self.waiting.peek(), self.running[-1]
        if head.priority > victim.priority and self.waiting.key(head) < self.waiting.key(victim):
            self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []

        # Running sequences, highest class first, oldest first within one: the last of that
        # order (lowest class, newest) is the one to preempt.
        self.running.sort(key=lambda s: (-s.priority, self.waiting.key(s)))
        # 0. a full batch makes room for a waiting request of a higher class
        self._preempt_for_priority(batch)

        # 1. running sequences in that order; preempt the last when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            while not self.blocks.ensure_slots(seq, seq.num_computed + n):
                victim = self.running.pop()
                if victim is seq and not self.running and i == 0:
                    # alone and still too big for the whole cache
                    self.running.append(seq)
                    batch.rejected.append(seq)
                    break
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break

        # 2. admit waiting sequences by (aged) priority
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if batch.rejected:
                break
            seq = self.waiting.peek()
            if not seq.block_table:
                cached = self.blocks.match_prefix(seq)
                seq.num_computed = cached
                if seq.cached_prompt_tokens < 0:
                    seq.cached_prompt_tokens = min(cached, seq.prompt_len)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self.blocks.ensure_slots(seq, seq.num_computed + n):
                if not self.running and not scheduled:
                    # nothing else holds blocks: it can never fit
                    self.waiting.pop()
                    batch.rejected.append(seq)
                    continue
                # keep the order; give back the prefix blocks so others can use them
                self.blocks.free_seq(seq)
                seq.num_computed = 0
                break
            self.waiting.pop()
            self.blocks.queried_tokens += len(seq.token_ids)
            self.blocks.hit_tokens += seq.num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n

        for seq, n in scheduled:
            if n == 1:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, n))
        return batch
