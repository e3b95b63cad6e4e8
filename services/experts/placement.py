"""Which shard owns which routed experts: contiguous slices, shard k owns [k*E/S, (k+1)*E/S)."""

from __future__ import annotations


def shard_range(num_experts: int, shard: int, num_shards: int) -> tuple[int, int]:
    if num_shards <= 0 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    if num_shards > num_experts:
        raise ValueError(f"{num_shards} shards for only {num_experts} routed experts")
    return shard * num_experts // num_shards, (shard + 1) * num_experts // num_shards
