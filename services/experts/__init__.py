"""Routed-expert execution over gRPC: expert shard servers and the engine-side executor."""

from services.experts.remote import ExpertShardError, RemoteExpertExecutor, ShardStatus
from services.experts.server import ExpertShardServer, ShardSpec, ThreadedShardServer, load_shard

__all__ = [
    "ExpertShardError",
    "ExpertShardServer",
    "RemoteExpertExecutor",
    "ShardSpec",
    "ShardStatus",
    "ThreadedShardServer",
    "load_shard",
]
