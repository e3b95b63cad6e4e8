"""Counters and latency samples the servers export (a snapshot is a plain dataclass)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from services.engine.priority import Priority


@dataclass
class MetricsSnapshot:
    running: int
    waiting: int
    cache_blocks_used: int
    cache_blocks_total: int
    prefix_cache_hit_rate: float
    prompt_tokens: int  # prompt tokens of finished-admission requests
    cached_prompt_tokens: int  # of those, served from the prefix cache
    computed_prompt_tokens: int  # prompt tokens actually run through the model
    generation_tokens: int
    recomputed_tokens: int  # tokens computed again after preemption
    num_preemptions: int
    requests_finished: int
    # per priority class label (free, pro, internal): queued requests and their tokens still
    # to compute, and new requests refused by load shedding since start
    waiting_by_priority: dict[str, int] = field(default_factory=dict)
    waiting_tokens_by_priority: dict[str, int] = field(default_factory=dict)
    shed_by_priority: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)  # recent time-to-first-token samples
    tpot_s: list[float] = field(default_factory=list)  # recent time-per-output-token samples


class Metrics:
    """Mutable counters kept by the engine's step loop."""

    def __init__(self, window: int = 1000):
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.computed_prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished = 0
        self.ttft: deque[float] = deque(maxlen=window)
        self.tpot: deque[float] = deque(maxlen=window)
        self.shed: dict[str, int] = {p.label: 0 for p in Priority}
        # samples are appended by the step thread and read by servers' threads
        self.lock = threading.Lock()

    def add_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.append(seconds)

    def add_tpot(self, seconds: float) -> None:
        with self.lock:
            self.tpot.append(seconds)

    def count_shed(self, priority: Priority) -> None:
        with self.lock:  # callers' threads, not only the step thread
            self.shed[priority.label] += 1

    def shed_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.shed)

    def samples(self) -> tuple[list[float], list[float]]:
        with self.lock:
            return list(self.ttft), list(self.tpot)
