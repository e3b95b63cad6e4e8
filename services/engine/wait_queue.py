"""The scheduler's waiting queue: by priority class, first come first served within one, with
aging so that no request starves.

A request of class p that arrived at time t is ordered by its virtual arrival
`t - p * aging_s`: it goes ahead of lower-class requests that arrived less than p * aging_s
before it, and behind those that have waited longer. This is the same order as ranking by
"class + time waited / aging_s" at any instant (the common `now` cancels out), so the order
never changes while requests wait and a heap keeps it.

It also keeps the queued work per class (requests and tokens still to compute), which load
shedding and the metrics read from other threads: plain ints, a read may be a step stale.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from services.engine.priority import Priority
from services.engine.sequence import Sequence


class WaitQueue:
    def __init__(self, aging_s: float) -> None:
        self.aging_s = aging_s
        self._heap: list[tuple[float, int, Sequence]] = []
        self._ties = itertools.count()  # equal keys: insertion order
        self.requests = dict.fromkeys(Priority, 0)
        self.tokens = dict.fromkeys(Priority, 0)
        self._tokens_of: dict[int, int] = {}  # id(seq) -> tokens counted when it was pushed

    def key(self, seq: Sequence) -> float:
        return seq.arrival - int(seq.priority) * self.aging_s

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (self.key(seq), next(self._ties), seq))
        work = len(seq.token_ids) - seq.num_computed
        self._tokens_of[id(seq)] = work
        self.requests[seq.priority] += 1
        self.tokens[seq.priority] += work

    def peek(self) -> Sequence:
        return self._heap[0][2]

    def pop(self) -> Sequence:
        seq = heapq.heappop(self._heap)[2]
        self._uncount(seq)
        return seq

    def remove(self, seq: Sequence) -> bool:
        for i, (_, _, s) in enumerate(self._heap):
            if s is seq:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                self._uncount(seq)
                return True
        return False

    def _uncount(self, seq: Sequence) -> None:
        self.requests[seq.priority] -= 1
        self.tokens[seq.priority] -= self._tokens_of.pop(id(seq))

    @property
    def total_requests(self) -> int:
        return len(self._heap)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        """In admission order (sorts a copy: for tests and inspection, not the hot path)."""
        return (s for _, _, s in sorted(self._heap, key=lambda e: e[:2]))

    def __getitem__(self, i: int) -> Sequence:
        return list(self)[i]
