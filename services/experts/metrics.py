"""Prometheus export of expert traffic.

Counting happens in torch tensors on the hot path (one bincount per MoE layer per step); the
collector turns them into counters only when scraped, so a step never pays for thousands of
labelled `inc()` calls.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

import torch
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class ExpertTraffic:
    """Counters of one executor: tokens per expert per layer, bytes, shards reached per token."""

    def __init__(self, moe_layers: list[int], num_experts: int, num_shards: int) -> None:
        self.moe_layers = list(moe_layers)
        self._row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.num_experts = num_experts
        self.num_shards = num_shards
        self.expert_tokens = torch.zeros(len(moe_layers), num_experts, dtype=torch.int64)
        # shards_per_token[k] = token-layer dispatches that reached exactly k shards
        self.shards_per_token = torch.zeros(num_shards + 1, dtype=torch.int64)
        self.bytes_sent = [0] * num_shards
        self.bytes_received = [0] * num_shards
        self.exchanges = [0] * num_shards
        self.lock = threading.Lock()

    def record_routing(
        self, layer: int, expert_ids: torch.Tensor, shards_hit: torch.Tensor
    ) -> None:
        """expert_ids [T, K]; shards_hit [T] number of distinct shards each token reached."""
        load = torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts)
        reached = torch.bincount(shards_hit, minlength=self.num_shards + 1)
        with self.lock:
            row = self._row.get(layer)
            if row is None:  # a layer not announced up front: grow the table
                row = self._row[layer] = len(self.moe_layers)
                self.moe_layers.append(layer)
                pad = torch.zeros(1, self.num_experts, dtype=torch.int64)
                self.expert_tokens = torch.cat([self.expert_tokens, pad])
            self.expert_tokens[row] += load[: self.num_experts]
            self.shards_per_token += reached[: self.num_shards + 1]

    def record_exchange(self, shard: int, sent: int, received: int) -> None:
        with self.lock:
            self.bytes_sent[shard] += sent
            self.bytes_received[shard] += received
            self.exchanges[shard] += 1

    @property
    def max_shards_per_token(self) -> int:
        nonzero = torch.nonzero(self.shards_per_token).flatten()
        return int(nonzero.max()) if len(nonzero) else 0

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent)

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "expert_tokens": {
                    layer: self.expert_tokens[i].tolist() for i, layer in enumerate(self.moe_layers)
                },
                "shards_per_token": self.shards_per_token.tolist(),
                "max_shards_per_token": self.max_shards_per_token,
                "bytes_sent": list(self.bytes_sent),
                "bytes_received": list(self.bytes_received),
                "exchanges": list(self.exchanges),
            }


class _TrafficCollector(Collector):
    def __init__(self) -> None:
        self.sources: weakref.WeakSet[ExpertTraffic] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "dsv2_expert_tokens",
            "Tokens routed to each routed expert, per MoE layer",
            labels=["layer", "expert"],
        )
        sent = CounterMetricFamily(
            "dsv2_expert_bytes_sent", "Bytes sent to each expert shard", labels=["shard"]
        )
        received = CounterMetricFamily(
            "dsv2_expert_bytes_received", "Bytes received from each expert shard", labels=["shard"]
        )
        reached = CounterMetricFamily(
            "dsv2_expert_token_dispatches",
            "Token-layer dispatches by the number of shards the token reached",
            labels=["shards"],
        )
        totals: dict[tuple[str, str], int] = {}
        by_shard_sent: dict[str, int] = {}
        by_shard_recv: dict[str, int] = {}
        by_reach: dict[str, int] = {}
        for source in list(self.sources):
            snap = source.snapshot()
            for layer, counts in snap["expert_tokens"].items():
                for expert, count in enumerate(counts):
                    key = (str(layer), str(expert))
                    totals[key] = totals.get(key, 0) + count
            for shard, value in enumerate(snap["bytes_sent"]):
                by_shard_sent[str(shard)] = by_shard_sent.get(str(shard), 0) + value
            for shard, value in enumerate(snap["bytes_received"]):
                by_shard_recv[str(shard)] = by_shard_recv.get(str(shard), 0) + value
            for k, value in enumerate(snap["shards_per_token"]):
                by_reach[str(k)] = by_reach.get(str(k), 0) + value
        for (layer, expert), value in sorted(totals.items()):
            tokens.add_metric([layer, expert], value)
        for shard, value in sorted(by_shard_sent.items()):
            sent.add_metric([shard], value)
        for shard, value in sorted(by_shard_recv.items()):
            received.add_metric([shard], value)
        for k, value in sorted(by_reach.items()):
            reached.add_metric([k], value)
        yield from (tokens, sent, received, reached)


_collector = _TrafficCollector()
_registered = False
_register_lock = threading.Lock()


def register(traffic: ExpertTraffic) -> None:
    """Export this executor's counters from the default prometheus registry."""
    global _registered
    with _register_lock:
        if not _registered:
            REGISTRY.register(_collector)
            _registered = True
        _collector.sources.add(traffic)
