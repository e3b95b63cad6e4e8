"""Training batches made in a background process while the model trains on the last ones.

Drawing pictures with Pillow took ~40% of a reading step when done in the training loop: one
worker process makes the batches (one at a time, in order, so the stream is exactly the one the
generator would give in the foreground) and the training loop only waits when it is ahead of
it. On a 2-core machine this gains nothing (the worker takes a core the math used); it pays
where a core is spare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset

T = TypeVar("T")


class _Stream(IterableDataset):
    def __init__(self, make: Callable[[], Iterator[T]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[T]:
        return self.make()


def _one_thread(_: int) -> None:
    # the worker draws pictures; the training loop's threads keep the cores' math
    torch.set_num_threads(1)


@contextmanager
def in_background(make: Callable[[], Iterator[T]], ahead: int = 8) -> Iterator[Iterator[T]]:
    """`make()`'s items, made in a worker process up to `ahead` items in advance; the worker
    stops when the block ends. `make` is pickled to the worker: a module-level function or a
    functools.partial of one."""
    loader = DataLoader(
        _Stream(make),
        batch_size=None,
        num_workers=1,
        prefetch_factor=ahead,
        worker_init_fn=_one_thread,
        # spawn, not fork: the trainer may run in a process with other threads (a test
        # session), and a forked child can inherit a lock one of them held
        multiprocessing_context="spawn",
    )
    items = iter(loader)
    try:
        yield items
    finally:
        del items  # the iterator's finaliser stops the worker
