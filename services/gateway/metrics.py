"""Prometheus metrics, one registry per gateway instance (tests build several apps per
process; the default global registry would refuse duplicate names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dsv2_gateway_http_requests_total",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "dsv2_gateway_http_request_seconds",
            "HTTP time to response headers by route template",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.grpc_requests = Counter(
            "dsv2_gateway_grpc_requests_total",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "dsv2_gateway_quota_rejections_total",
            "requests refused by a quota",
            ["reason"],
            registry=r,
        )
        self.turns = Counter(
            "dsv2_gateway_turns_total",
            "generations by how they ended",
            ["finish_reason"],
            registry=r,
        )
        self.tokens = Counter(
            "dsv2_gateway_tokens_total",
            "tokens charged to users",
            ["kind"],
            registry=r,
        )
        self.active_streams = Gauge(
            "dsv2_gateway_active_generations",
            "generations running through this replica",
            registry=r,
        )
        self.ttft = Histogram(
            "dsv2_gateway_time_to_first_token_seconds",
            "admission to first generated text",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.redis_errors = Counter(
            "dsv2_gateway_redis_unavailable_total",
            "requests answered 503 because Redis was unreachable",
            registry=r,
        )
        self.backend_errors = Counter(
            "dsv2_gateway_model_plane_errors_total",
            "model plane failures seen by the gateway",
            registry=r,
        )
        # Labelled children, looked up once: prometheus_client's labels() validates and
        # locks on every call, a measurable share of a request's CPU.
        self._children: dict[tuple, MetricWrapperBase] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.child(self.requests, route, method, str(status)).inc()
        self.child(self.latency, route).observe(seconds)
