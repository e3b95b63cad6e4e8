"""Readiness of one Helm release of the dsv2 chart, read from the Kubernetes API.

The chart labels every object with `app.kubernetes.io/instance=<release>` and
`app.kubernetes.io/component=<part>`, so the objects are found by label whatever their names
(`fullnameOverride` and friends). Each check is a pure function of the object's JSON so it
can be read (and tested) without a cluster.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import yaml

INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
# Set by the chart on the gateway Deployment: "built-in" or "external".
REDIS_MODE_ANNOTATION = "dsv2.io/redis"
DEFAULT_APP_NAME = "dsv2"
RAY_METRICS_PORT = 8080  # Ray's Prometheus export on every Ray pod (the chart's "metrics")

Obj = dict[str, Any]


@dataclass(frozen=True)
class ComponentStatus:
    component: str  # rayservice | serve-app | gateway | redis
    name: str
    ready: bool
    detail: str


class ApiError(RuntimeError):
    """The Kubernetes API could not be read (unreachable, forbidden, ...)."""


# --- pure checks -----------------------------------------------------------------------------


def _condition(obj: Obj, kind: str) -> Obj | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def serve_app_name(rayservice: Obj) -> str:
    """The first application's name in the RayService's serveConfigV2."""
    try:
        config = yaml.safe_load(rayservice.get("spec", {}).get("serveConfigV2") or "") or {}
        return str(config["applications"][0]["name"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return DEFAULT_APP_NAME


def engine_metrics_port(rayservice: Obj) -> int | None:
    """The Engine replicas' own Prometheus port (the app's `metrics_port` arg, which the chart
    sets from serve.metricsPort), or None when they serve none."""
    try:
        config = yaml.safe_load(rayservice.get("spec", {}).get("serveConfigV2") or "") or {}
        port = config["applications"][0]["args"].get("metrics_port")
    except (yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return port if isinstance(port, int) and not isinstance(port, bool) and port > 0 else None


def default_metrics_ports(rayservice: Obj) -> tuple[int, ...]:
    """Ray's export port on every Ray pod, plus the Engines' own port when they serve one."""
    port = engine_metrics_port(rayservice)
    return (RAY_METRICS_PORT,) if port in (None, RAY_METRICS_PORT) else (RAY_METRICS_PORT, port)


def rayservice_status(rayservice: Obj) -> ComponentStatus:
    name = rayservice["metadata"]["name"]
    status = rayservice.get("status") or {}
    ready_condition = _condition(rayservice, "Ready")
    if ready_condition is not None:
        # KubeRay >= 1.3 reports readiness as a condition.
        ready = ready_condition.get("status") == "True"
        state = ready_condition.get("reason") or ("Ready" if ready else "NotReady")
        if not ready and ready_condition.get("message"):
            state += f": {ready_condition['message']}"
    else:
        # Older operators only set serviceStatus ("Running" once serving).
        service_status = status.get("serviceStatus") or "Pending"
        ready = service_status == "Running"
        state = service_status
    cluster = (status.get("activeServiceStatus") or {}).get("rayClusterStatus") or {}
    cluster_name = (status.get("activeServiceStatus") or {}).get("rayClusterName")
    detail = state
    if cluster_name:
        workers = cluster.get("readyWorkerReplicas", cluster.get("availableWorkerReplicas", 0))
        desired = cluster.get("desiredWorkerReplicas", 0)
        detail += f" (cluster {cluster_name}, workers {workers}/{desired} ready)"
    upgrade = _condition(rayservice, "UpgradeInProgress")
    if upgrade is not None and upgrade.get("status") == "True":
        detail += ", upgrade in progress"
    return ComponentStatus("rayservice", name, ready, detail)


def serve_app_status(rayservice: Obj) -> ComponentStatus:
    app = serve_app_name(rayservice)
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    statuses = active.get("applicationStatuses") or {}
    if app not in statuses:
        return ComponentStatus("serve-app", app, False, "not deployed yet")
    app_status = statuses[app]
    state = app_status.get("status") or "UNKNOWN"
    deployments = app_status.get("serveDeploymentStatuses") or {}
    parts = [f"{name} {d.get('status', 'UNKNOWN')}" for name, d in sorted(deployments.items())]
    detail = state + (f" ({', '.join(parts)})" if parts else "")
    if state != "RUNNING" and app_status.get("message"):
        detail += f": {app_status['message']}"
    return ComponentStatus("serve-app", app, state == "RUNNING", detail)


def deployment_status(deployment: Obj) -> ComponentStatus:
    name = deployment["metadata"]["name"]
    wanted = deployment.get("spec", {}).get("replicas", 1)
    status = deployment.get("status") or {}
    available = status.get("availableReplicas", 0)
    updated = status.get("updatedReplicas", 0)
    current = status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
    ready = current and wanted > 0 and available >= wanted and updated >= wanted
    detail = f"{available}/{wanted} available"
    if updated < wanted:
        detail += f", {updated}/{wanted} updated"
    if not current:
        detail += ", rollout not observed yet"
    return ComponentStatus("gateway", name, ready, detail)


def statefulset_status(statefulset: Obj) -> ComponentStatus:
    name = statefulset["metadata"]["name"]
    wanted = statefulset.get("spec", {}).get("replicas", 1)
    status = statefulset.get("status") or {}
    ready_replicas = status.get("readyReplicas", 0)
    ready = wanted > 0 and ready_replicas >= wanted
    return ComponentStatus("redis", name, ready, f"{ready_replicas}/{wanted} ready")


def evaluate(
    rayservices: list[Obj], deployments: list[Obj], statefulsets: list[Obj]
) -> list[ComponentStatus]:
    """Statuses of every part of a release from the objects found by its labels."""
    results: list[ComponentStatus] = []
    if not rayservices:
        results.append(ComponentStatus("rayservice", "-", False, "no RayService found"))
        results.append(ComponentStatus("serve-app", "-", False, "no RayService found"))
    for rayservice in rayservices:
        results.append(rayservice_status(rayservice))
        results.append(serve_app_status(rayservice))
    if not deployments:
        results.append(ComponentStatus("gateway", "-", False, "no gateway Deployment found"))
    results.extend(deployment_status(d) for d in deployments)
    external = any(
        (d["metadata"].get("annotations") or {}).get(REDIS_MODE_ANNOTATION) == "external"
        for d in deployments
    )
    if statefulsets:
        results.extend(statefulset_status(s) for s in statefulsets)
    elif external:
        # Not ours to check: the gateway's readiness probe already requires Redis to answer.
        results.append(ComponentStatus("redis", "external", True, "external Redis (not checked)"))
    else:
        results.append(ComponentStatus("redis", "-", False, "no Redis StatefulSet found"))
    return results


# --- reading the API ---------------------------------------------------------------------------


def _selector(release: str, component: str) -> str:
    return f"{INSTANCE_LABEL}={release},{COMPONENT_LABEL}={component}"


def _items(response: Any) -> list[Obj]:
    # `_preload_content=False` hands back the raw response: plain JSON, no typed models.
    return list(json.loads(response.data).get("items") or [])


DASHBOARD_PORT = 8265
PROXY_TIMEOUT_S = 10.0


def fetch(
    api_client: Any,
    release: str,
    namespace: str,
    metrics_ports: tuple[int, ...] | None = None,
) -> list[ComponentStatus]:
    """Read the release's objects through `api_client` (a kubernetes.client.ApiClient), then
    the model plane's load (replicas, queue depth per tier, shed requests) from the pods'
    `metrics_ports` (None: Ray's 8080 plus the Engines' port named in the serveConfigV2)."""
    statuses, rayservices = _fetch_objects(api_client, release, namespace)
    for rayservice in rayservices:
        ports = metrics_ports or default_metrics_ports(rayservice)
        statuses.extend(_fetch_load(api_client, release, namespace, rayservice, ports))
    return statuses


def _proxy_get(api_client: Any, kind: str, name: str, namespace: str, path: str) -> str:
    """GET `path` on a Service or Pod port through the API server's proxy. Built by hand: the
    generated connect_get_*_proxy_with_path escape the slashes of `path` (%2F)."""
    method, url, headers, _, _ = api_client.param_serialize(
        method="GET",
        resource_path=f"/api/v1/namespaces/{{namespace}}/{kind}/{{name}}/proxy/{path}",
        path_params={"namespace": namespace, "name": name},
        header_params={"Accept": "*/*"},
        auth_settings=["BearerToken"],
    )
    response = api_client.call_api(
        method, url, header_params=headers, _request_timeout=PROXY_TIMEOUT_S
    )
    response.read()
    if not 200 <= response.status < 300:
        raise ApiError(f"the proxy to {kind}/{name} answered {response.status} {response.reason}")
    return response.data.decode("utf-8", "replace")


def _why(exc: Exception) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return f"Kubernetes API answered {exc.status} {exc.reason}"
    if isinstance(exc, ApiError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _fetch_load(
    api_client: Any, release: str, namespace: str, rayservice: Obj, metrics_ports: tuple[int, ...]
) -> list[ComponentStatus]:
    """Serve's replica counts from the head's dashboard and the per-tier metrics of the Ray
    pods, both through the API server's proxy. Any failure becomes an 'unavailable' row."""
    from kubernetes import client

    from services.k8s import load

    core = client.CoreV1Api(api_client)
    app = serve_app_name(rayservice)
    replicas, replicas_error = None, None
    # KubeRay keeps "<rayservice>-head-svc" pointed at the active cluster's head.
    head = f"{rayservice['metadata']['name']}-head-svc:{DASHBOARD_PORT}"
    try:
        text = _proxy_get(api_client, "services", head, namespace, "api/serve/applications/")
        replicas = load.serve_replicas(json.loads(text), app)
    except Exception as exc:  # informational: never fail the status for it
        replicas_error = f"Serve API on {head}: {_why(exc)}"
    engine_load, load_error = None, None
    try:
        pods = []
        for component in ("ray-head", "ray-worker"):
            pods += _items(
                core.list_namespaced_pod(
                    namespace,
                    label_selector=_selector(release, component),
                    _preload_content=False,
                )
            )
        texts = []
        for pod in pods:
            if (pod.get("status") or {}).get("phase") != "Running":
                continue
            for port in metrics_ports:
                try:
                    pod_port = f"{pod['metadata']['name']}:{port}"
                    texts.append(_proxy_get(api_client, "pods", pod_port, namespace, "metrics"))
                except Exception:  # a pod without this port, a pod going away
                    continue
        engine_load = load.parse_engine_metrics(texts)
    except Exception as exc:
        load_error = f"Ray pods' metrics: {_why(exc)}"
    return load.load_statuses(app, replicas, replicas_error, engine_load, load_error)


def _fetch_objects(
    api_client: Any, release: str, namespace: str
) -> tuple[list[ComponentStatus], list[Obj]]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    apps = client.AppsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    try:
        rayservices = _items(
            custom.list_namespaced_custom_object(
                "ray.io",
                "v1",
                namespace,
                "rayservices",
                label_selector=_selector(release, "model-plane"),
                _preload_content=False,
            )
        )
        deployments = _items(
            apps.list_namespaced_deployment(
                namespace, label_selector=_selector(release, "gateway"), _preload_content=False
            )
        )
        statefulsets = _items(
            apps.list_namespaced_stateful_set(
                namespace, label_selector=_selector(release, "redis"), _preload_content=False
            )
        )
    except ApiException as exc:
        raise ApiError(f"Kubernetes API answered {exc.status} {exc.reason}: {exc.body}") from exc
    except HTTPError as exc:
        raise ApiError(f"cannot reach the Kubernetes API: {exc}") from exc
    return evaluate(rayservices, deployments, statefulsets), rayservices


def as_json(statuses: list[ComponentStatus]) -> str:
    return json.dumps(
        {"ready": all(s.ready for s in statuses), "components": [asdict(s) for s in statuses]},
        indent=2,
    )


def as_table(statuses: list[ComponentStatus]) -> str:
    rows = [("COMPONENT", "NAME", "READY", "DETAIL")]
    rows += [(s.component, s.name, "yes" if s.ready else "NO", s.detail) for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    )
