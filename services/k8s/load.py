"""Load of a release's model plane for `dsv2 k8s status`: Serve replicas per deployment, queue
depth per tier and shed requests.

Two sources, both read through the Kubernetes API server's proxy (no port-forward):
- Serve's REST API on the Ray head's dashboard (`/api/serve/applications/`): running and
  target replicas of every deployment (autoscaling moves the target);
- the Prometheus text of the Ray pods (Ray's metrics export port, or the Engine's own
  metrics_port): `dsv2_engine_queue_depth{tier}` gauges and the
  `dsv2_engine_shed_requests_total{tier}` counter, summed over pods. Ray's exporter prefixes
  metrics it exports with `ray_`; both spellings are read.

Either may be missing (an older image without the per-tier metrics, a dashboard not yet up):
the rows then say so and never make the release look unready.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.k8s.status import ComponentStatus

QUEUE_DEPTH = "dsv2_engine_queue_depth"
SHED = "dsv2_engine_shed_requests_total"
TIER_ORDER = ("internal", "pro", "free")


@dataclass(frozen=True)
class EngineLoad:
    queue_depth: dict[str, float]  # tier -> waiting requests over all replicas
    shed: dict[str, float]  # tier -> requests refused since the replicas started
    found: bool  # any per-tier metric seen at all


def _metric_name(sample_name: str) -> str:
    return sample_name.removeprefix("ray_")


def parse_engine_metrics(texts: list[str]) -> EngineLoad:
    """Sum the per-tier gauges and counters over the scraped pages (one per pod)."""
    queue: dict[str, float] = defaultdict(float)
    shed: dict[str, float] = defaultdict(float)
    found = False
    for text in texts:
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue  # not Prometheus text (a proxy error page): nothing to read there
        for family in families:
            for sample in family.samples:
                name = _metric_name(sample.name)
                tier = sample.labels.get("tier", "")
                if name == QUEUE_DEPTH:
                    queue[tier] += sample.value
                    found = True
                elif name == SHED:
                    shed[tier] += sample.value
                    found = True
    return EngineLoad(dict(queue), dict(shed), found)


def serve_replicas(details: dict[str, Any], app: str) -> dict[str, tuple[int, int]]:
    """Deployment -> (running replicas, target replicas) of one application, from Serve's
    `/api/serve/applications/` answer."""
    deployments = ((details.get("applications") or {}).get(app) or {}).get("deployments") or {}
    counts: dict[str, tuple[int, int]] = {}
    for name, d in sorted(deployments.items()):
        running = sum(1 for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
        target = d.get("target_num_replicas")
        if target is None:
            target = (d.get("deployment_config") or {}).get("num_replicas", running)
        counts[name] = (running, int(target))
    return counts


def _tiers(values: dict[str, float]) -> str:
    order = [t for t in TIER_ORDER if t in values] + sorted(set(values) - set(TIER_ORDER))
    return ", ".join(f"{t or '-'} {values[t]:g}" for t in order)


def load_statuses(
    app: str,
    replicas: dict[str, tuple[int, int]] | None,
    replicas_error: str | None,
    load: EngineLoad | None,
    load_error: str | None,
) -> list[ComponentStatus]:
    """The `replicas` and `load` rows of the status table (informational: they stay ready
    when their source is missing)."""
    rows = []
    if replicas is None:
        rows.append(ComponentStatus("replicas", app, True, f"unavailable: {replicas_error}"))
    elif not replicas:
        rows.append(ComponentStatus("replicas", app, True, "no deployments reported yet"))
    else:
        parts = [f"{name} {running}/{target}" for name, (running, target) in replicas.items()]
        engine = replicas.get("Engine")
        ready = engine is None or engine[0] > 0
        rows.append(ComponentStatus("replicas", app, ready, "running/target: " + ", ".join(parts)))
    if load is None:
        rows.append(ComponentStatus("load", "engine", True, f"unavailable: {load_error}"))
    elif not load.found:
        rows.append(
            ComponentStatus(
                "load", "engine", True, f"no per-tier metrics ({QUEUE_DEPTH}) on the Ray pods"
            )
        )
    else:
        detail = f"queue depth {_tiers(load.queue_depth) or '0'}; shed {_tiers(load.shed) or '0'}"
        rows.append(ComponentStatus("load", "engine", True, detail))
    return rows
