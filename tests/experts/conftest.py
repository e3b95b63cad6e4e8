"""Expert shards as real grpc.aio servers on 127.0.0.1 in this process (no Ray needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from services.experts import RemoteExpertExecutor, ThreadedShardServer

# Two busy cores: one intra-op thread keeps small ops from waiting on a descheduled peer.
torch.set_num_threads(1)


@pytest.fixture
def shard_servers(
    tiny_checkpoint: Path,
) -> Iterator[Callable[[int], list[ThreadedShardServer]]]:
    """start(S) -> S started shard servers of tiny_checkpoint; all stopped at the end."""
    started: list[ThreadedShardServer] = []

    def start(num_shards: int) -> list[ThreadedShardServer]:
        servers = [
            ThreadedShardServer.from_checkpoint(tiny_checkpoint, k, num_shards)
            for k in range(num_shards)
        ]
        for server in servers:
            server.start("127.0.0.1", 0)
            started.append(server)
        return servers

    yield start
    for server in started:
        server.stop(grace=None)


@pytest.fixture
def remote_executor(
    tiny_checkpoint: Path, shard_servers: Callable[[int], list[ThreadedShardServer]]
) -> Iterator[Callable[..., tuple[RemoteExpertExecutor, list[ThreadedShardServer]]]]:
    """make(S, **kw) -> (connected RemoteExpertExecutor, its S fresh shard servers)."""
    made: list[RemoteExpertExecutor] = []

    def make(num_shards: int, **kwargs) -> tuple[RemoteExpertExecutor, list[ThreadedShardServer]]:
        servers = shard_servers(num_shards)
        executor = RemoteExpertExecutor.for_checkpoint(
            str(tiny_checkpoint), num_shards, targets=[s.address for s in servers], **kwargs
        )
        executor.connect(timeout=10)
        made.append(executor)
        return executor, servers

    yield make
    for executor in made:
        executor.close()
