"""Prometheus export of the engine's queue: depth per tier and shed requests.

The `tier` label is the request's priority class (free, pro, internal: what the gateway maps
each quota tier to). A collector reads the engines' counters when scraped (nothing is updated
on the step path). The model plane's Engine replicas register here and serve the default
registry on `metrics_port` (services/serving/app.py), next to the expert traffic counters;
`dsv2 k8s status` sums these names over pods (services/k8s/load.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from services.engine.engine import Engine


class EngineQueueCollector(Collector):
    def __init__(self) -> None:
        self.engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "dsv2_engine_queue_depth",
            "Requests waiting to be admitted, per tier (priority class)",
            labels=["tier"],
        )
        tokens = GaugeMetricFamily(
            "dsv2_engine_queue_tokens",
            "Tokens still to compute of the waiting requests, per tier (priority class)",
            labels=["tier"],
        )
        running = GaugeMetricFamily("dsv2_engine_running_requests", "Requests being generated")
        shed = CounterMetricFamily(
            "dsv2_engine_shed_requests",
            "New requests refused by load shedding, per tier (priority class)",
            labels=["tier"],
        )
        sums: dict[str, list[int]] = {}
        total_running = 0
        for engine in list(self.engines):
            m = engine.metrics
            total_running += m.running
            for label, n in m.waiting_by_priority.items():
                sums.setdefault(label, [0, 0, 0])[0] += n
            for label, n in m.waiting_tokens_by_priority.items():
                sums.setdefault(label, [0, 0, 0])[1] += n
            for label, n in m.shed_by_priority.items():
                sums.setdefault(label, [0, 0, 0])[2] += n
        for label, (w, t, s) in sorted(sums.items()):
            waiting.add_metric([label], w)
            tokens.add_metric([label], t)
            shed.add_metric([label], s)
        running.add_metric([], total_running)
        yield from (waiting, tokens, running, shed)


_collector = EngineQueueCollector()
_registered: set[int] = set()
_lock = threading.Lock()


def register(engine: Engine, registry: CollectorRegistry = REGISTRY) -> None:
    """Export this engine's queue metrics from `registry` (the default one: what the model
    plane's metrics port serves)."""
    with _lock:
        if id(registry) not in _registered:
            registry.register(_collector)
            _registered.add(id(registry))
        _collector.engines.add(engine)
