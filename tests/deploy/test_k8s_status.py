"""`dsv2 k8s status` against a Kubernetes API.

There is no Kubernetes cluster here, so the test serves a small fake of the API server on
127.0.0.1: it answers the few list calls the command makes (RayServices, Deployments,
StatefulSets, filtered by label selector), with objects taken from the chart's own render plus
the `status` a controller would write. The command runs unchanged through the real
`kubernetes` client and a kubeconfig pointing at the fake.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import yaml

from services.cli import main as dsv2_main
from services.k8s.status import default_metrics_ports
from tests.deploy.conftest import NAMESPACE, RELEASE, REPO_ROOT, find, rendered, strip

TOKEN = "fake-token-for-tests"
PATHS = {
    re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayservices$"): "RayService",
    re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments$"): "Deployment",
    re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/statefulsets$"): "StatefulSet",
    re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"): "Pod",
}
# The API server's proxy to a Service or a Pod port (Serve's REST API, Prometheus metrics).
PROXY = re.compile(r"^/api/v1/namespaces/([^/]+)/(services|pods)/([^/]+)/proxy/(.*)$")


class FakeKubeApi:
    """Objects by kind; `objects` may be swapped between requests (a rollout progressing)."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.on_request: Callable[[FakeKubeApi], None] | None = None
        # ("services" | "pods", "name:port", path) -> body; anything else answers 503 as the
        # API server does when nothing listens behind the proxy.
        self.proxied: dict[tuple[str, str, str], str] = {}

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        return [
            o
            for o in self.objects
            if o["kind"] == kind
            and o["metadata"].get("namespace") == namespace
            and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]


def _handler(api: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            api.requests.append(self.path)
            if api.on_request is not None:
                api.on_request(api)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(
                    401,
                    {"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401},
                )
                return
            proxy = PROXY.match(url.path)
            if proxy:
                key = (proxy.group(2), unquote(proxy.group(3)), proxy.group(4))
                body = api.proxied.get(key)
                if body is None:
                    self._send(503, {"kind": "Status", "reason": "ServiceUnavailable", "code": 503})
                    return
                payload = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            for pattern, kind in PATHS.items():
                match = pattern.match(url.path)
                if match:
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    items = api.list(kind, match.group(1), selector)
                    self._send(
                        200,
                        {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {}, "items": items},
                    )
                    return
            self._send(
                404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
            )

    return Handler


@pytest.fixture
def fake_api() -> Iterator[tuple[FakeKubeApi, int]]:
    api = FakeKubeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def kubeconfig(
    fake_api: tuple[FakeKubeApi, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    _, port = fake_api
    path = tmp_path / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": TOKEN}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}
        ],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))
    # Talk to 127.0.0.1 directly, whatever proxy the environment names.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return path


# --- objects as a controller would report them ------------------------------------------------


def _live(scenario: str = "default") -> list[dict[str, Any]]:
    """The chart's RayService, gateway Deployment and Redis StatefulSet, all ready."""
    objects = []
    for obj in rendered(scenario):
        if obj["kind"] not in ("RayService", "Deployment", "StatefulSet"):
            continue
        live = strip(obj)
        live["metadata"].update(namespace=NAMESPACE, generation=2)
        if obj["kind"] == "RayService":
            live["status"] = {
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"},
                    {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster"},
                ],
                "serviceStatus": "Running",
                "activeServiceStatus": {
                    "rayClusterName": f"{live['metadata']['name']}-raycluster-x7k2p",
                    "rayClusterStatus": {"readyWorkerReplicas": 2, "desiredWorkerReplicas": 2},
                    "applicationStatuses": {
                        "dsv2": {
                            "status": "RUNNING",
                            "serveDeploymentStatuses": {
                                "Engine": {"status": "HEALTHY"},
                                "ExpertShard0": {"status": "HEALTHY"},
                            },
                        }
                    },
                },
            }
        elif obj["kind"] == "Deployment":
            live["spec"]["replicas"] = 2  # set by the HPA
            live["status"] = {
                "observedGeneration": 2,
                "replicas": 2,
                "updatedReplicas": 2,
                "availableReplicas": 2,
                "readyReplicas": 2,
            }
        else:
            live["status"] = {
                "observedGeneration": 2,
                "replicas": 1,
                "readyReplicas": 1,
                "currentReplicas": 1,
            }
        objects.append(live)
    return objects


def _get(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    (obj,) = find(objects, kind, component)
    return obj


def _status(kubeconfig: Path, *extra: str, release: str = RELEASE) -> int:
    return dsv2_main(
        ["k8s", "status", "--release", release, "--kubeconfig", str(kubeconfig), *extra]
    )


def test_ready_release_exits_zero_and_reports_each_part(fake_api, kubeconfig, capsys) -> None:
    api, _ = fake_api
    api.objects = _live()
    assert _status(kubeconfig) == 0
    out = capsys.readouterr().out
    assert f"release {RELEASE} in namespace {NAMESPACE}: READY" in out
    assert re.search(
        r"rayservice\s+chat-dsv2\s+yes\s+NonZeroServeEndpoints \(cluster chat-dsv2-raycluster-x7k2p, workers 2/2 ready\)",
        out,
    )
    assert re.search(
        r"serve-app\s+dsv2\s+yes\s+RUNNING \(Engine HEALTHY, ExpertShard0 HEALTHY\)", out
    )
    assert re.search(r"gateway\s+chat-dsv2-gateway\s+yes\s+2/2 available", out)
    assert re.search(r"redis\s+chat-dsv2-redis\s+yes\s+1/1 ready", out)
    # Found by the chart's labels in the kubeconfig's namespace (3 kinds, then Ray pods of
    # the head and worker groups for their metrics).
    lists = [r for r in api.requests if "/proxy/" not in r]
    assert len(lists) == 5
    for request in lists:
        url = urlparse(request)
        assert f"/namespaces/{NAMESPACE}/" in url.path
        selector = parse_qs(url.query)["labelSelector"][0]
        assert selector.startswith(f"app.kubernetes.io/instance={RELEASE},")


def test_the_real_command_line_exits_zero_when_ready(fake_api, kubeconfig) -> None:
    api, _ = fake_api
    api.objects = _live()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "k8s",
            "status",
            "--release",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            str(kubeconfig),
            "--output",
            "json",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ready"] is True
    assert [c["component"] for c in report["components"]] == [
        "rayservice",
        "serve-app",
        "gateway",
        "redis",
        "replicas",
        "load",
    ]


def _not_ready_serve_app(objects):
    app = _get(objects, "RayService")["status"]["activeServiceStatus"]["applicationStatuses"][
        "dsv2"
    ]
    app["status"] = "DEPLOYING"
    app["serveDeploymentStatuses"]["ExpertShard0"]["status"] = "UPDATING"
    return "serve-app", r"DEPLOYING \(Engine HEALTHY, ExpertShard0 UPDATING\)"


def _rayservice_not_ready(objects):
    rayservice = _get(objects, "RayService")
    rayservice["status"]["conditions"][0] = {
        "type": "Ready",
        "status": "False",
        "reason": "Initializing",
        "message": "waiting for the head Pod",
    }
    del rayservice["status"]["activeServiceStatus"]
    return "rayservice", r"Initializing: waiting for the head Pod"


def _gateway_rolling(objects):
    deployment = _get(objects, "Deployment")
    deployment["status"].update(availableReplicas=1, updatedReplicas=1)
    return "gateway", r"1/2 available, 1/2 updated"


def _redis_down(objects):
    _get(objects, "StatefulSet")["status"]["readyReplicas"] = 0
    return "redis", r"0/1 ready"


def _old_operator_pending(objects):
    # KubeRay before conditions: only serviceStatus.
    rayservice = _get(objects, "RayService")
    rayservice["status"] = {"serviceStatus": "WaitForServeDeploymentReady"}
    return "rayservice", r"WaitForServeDeploymentReady"


@pytest.mark.parametrize(
    "breakage",
    [
        _not_ready_serve_app,
        _rayservice_not_ready,
        _gateway_rolling,
        _redis_down,
        _old_operator_pending,
    ],
)
def test_not_ready_part_exits_one_and_says_which(fake_api, kubeconfig, capsys, breakage) -> None:
    api, _ = fake_api
    objects = _live()
    component, detail = breakage(objects)
    api.objects = objects
    assert _status(kubeconfig) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out
    assert re.search(rf"{component}\s+\S+\s+NO\s+{detail}", out), out


def test_unknown_release_is_not_ready(fake_api, kubeconfig, capsys) -> None:
    api, _ = fake_api
    api.objects = _live()
    assert _status(kubeconfig, release="other") == 1
    out = capsys.readouterr().out
    assert "no RayService found" in out and "no gateway Deployment found" in out


def test_external_redis_is_not_required_in_the_cluster(fake_api, kubeconfig, capsys) -> None:
    api, _ = fake_api
    api.objects = _live("v2-236b-multinode")
    assert not find(api.objects, "StatefulSet")
    assert _status(kubeconfig, "--output", "json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"][3] == {
        "component": "redis",
        "name": "external",
        "ready": True,
        "detail": "external Redis (not checked)",
    }


def test_wait_polls_until_the_rollout_finishes(fake_api, kubeconfig, capsys) -> None:
    api, _ = fake_api
    objects = _live()
    ready = copy.deepcopy(objects)
    _not_ready_serve_app(objects)
    api.objects = objects

    def finish_after_two_polls(fake: FakeKubeApi) -> None:
        if len(fake.requests) > 6:  # three list calls per poll
            fake.objects = ready

    api.on_request = finish_after_two_polls
    assert _status(kubeconfig, "--wait", "30", "--interval", "0.1") == 0
    assert len(api.requests) >= 9
    assert ": READY" in capsys.readouterr().out


def test_wait_gives_up_with_exit_one(fake_api, kubeconfig) -> None:
    api, _ = fake_api
    objects = _live()
    _redis_down(objects)
    api.objects = objects
    assert _status(kubeconfig, "--wait", "0.5", "--interval", "0.1") == 1
    assert len(api.requests) > 3


def test_api_errors_exit_two_with_a_message(fake_api, kubeconfig, tmp_path, capsys) -> None:
    # Wrong credentials: the API answers 401.
    config = json.loads(kubeconfig.read_text())
    config["users"][0]["user"]["token"] = "wrong"
    bad_token = tmp_path / "bad-token"
    bad_token.write_text(json.dumps(config))
    assert _status(bad_token) == 2
    assert "401" in capsys.readouterr().err
    # Nothing listening: a port that was free a moment ago.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port}"
    unreachable = tmp_path / "unreachable"
    unreachable.write_text(json.dumps(config))
    assert _status(unreachable) == 2
    assert "cannot reach the Kubernetes API" in capsys.readouterr().err
    # No kubeconfig at all.
    assert _status(tmp_path / "missing") == 2
    assert "cannot load Kubernetes configuration" in capsys.readouterr().err


# --- load: replicas, queue depth per tier, shed requests ---------------------------------------

SERVE_DETAILS = {
    "applications": {
        "dsv2": {
            "deployments": {
                "Engine": {
                    "target_num_replicas": 3,  # autoscaling asked for a third
                    "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}],
                },
                "ExpertShard0": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
            }
        }
    }
}
# One pod exports through Ray (ray_ prefix), the other from the Engine's own prometheus port.
RAY_EXPORT = """# TYPE ray_dsv2_engine_queue_depth gauge
ray_dsv2_engine_queue_depth{tier="free",Component="core_worker"} 7
ray_dsv2_engine_queue_depth{tier="pro",Component="core_worker"} 1
# TYPE ray_dsv2_engine_shed_requests_total counter
ray_dsv2_engine_shed_requests_total{tier="free"} 30
"""
ENGINE_EXPORT = """# TYPE dsv2_engine_queue_depth gauge
dsv2_engine_queue_depth{tier="free"} 5
dsv2_engine_queue_depth{tier="internal"} 0
# TYPE dsv2_engine_shed_requests counter
dsv2_engine_shed_requests_total{tier="free"} 10
dsv2_engine_shed_requests_total{tier="pro"} 0
"""


def _ray_pod(name: str, component: str, phase: str = "Running") -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": component}
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "status": {"phase": phase},
    }


def test_status_shows_replicas_queue_depth_and_shed_requests(fake_api, kubeconfig, capsys):
    api, _ = fake_api
    api.objects = [
        *_live(),
        _ray_pod("head-0", "ray-head"),
        _ray_pod("attention-a", "ray-worker"),
        _ray_pod("attention-b", "ray-worker"),
        _ray_pod("attention-c", "ray-worker", phase="Pending"),  # not scraped
    ]
    api.proxied = {
        ("services", "chat-dsv2-head-svc:8265", "api/serve/applications/"): json.dumps(
            SERVE_DETAILS
        ),
        ("pods", "attention-a:8080", "metrics"): RAY_EXPORT,
        ("pods", "attention-b:9400", "metrics"): ENGINE_EXPORT,
        ("pods", "head-0:8080", "metrics"): "# nothing of ours here\n",
    }
    assert _status(kubeconfig, "--metrics-port", "8080", "--metrics-port", "9400") == 0
    out = capsys.readouterr().out
    assert re.search(
        r"replicas\s+dsv2\s+yes\s+running/target: Engine 2/3, ExpertShard0 1/1", out
    ), api.requests
    assert re.search(
        r"load\s+engine\s+yes\s+queue depth internal 0, pro 1, free 12; shed pro 0, free 40", out
    ), out
    assert not any("attention-c" in r for r in api.requests)


def test_status_without_load_sources_still_reports_ready(fake_api, kubeconfig, capsys):
    # A dashboard not up yet and no pods to scrape: the rows say so, readiness is unchanged.
    api, _ = fake_api
    api.objects = _live()
    assert _status(kubeconfig) == 0
    out = capsys.readouterr().out
    assert re.search(r"replicas\s+dsv2\s+yes\s+unavailable: Serve API on chat-dsv2-head-svc", out)
    assert re.search(r"load\s+engine\s+yes\s+no per-tier metrics \(dsv2_engine_queue_depth\)", out)


def test_no_running_engine_replica_is_not_ready(fake_api, kubeconfig, capsys):
    api, _ = fake_api
    api.objects = _live()
    details = json.loads(json.dumps(SERVE_DETAILS))
    details["applications"]["dsv2"]["deployments"]["Engine"]["replicas"] = []
    api.proxied = {
        ("services", "chat-dsv2-head-svc:8265", "api/serve/applications/"): json.dumps(details)
    }
    assert _status(kubeconfig) == 1
    assert re.search(r"replicas\s+dsv2\s+NO\s+running/target: Engine 0/3", capsys.readouterr().out)


def _pods_and_exports(api: FakeKubeApi, objects: list[dict[str, Any]]) -> None:
    api.objects = [
        *objects,
        _ray_pod("head-0", "ray-head"),
        _ray_pod("attention-a", "ray-worker"),
        _ray_pod("attention-b", "ray-worker"),
    ]
    api.proxied = {
        ("pods", "attention-a:8080", "metrics"): RAY_EXPORT,
        ("pods", "attention-b:9400", "metrics"): ENGINE_EXPORT,
        ("pods", "head-0:8080", "metrics"): "# nothing of ours here\n",
    }


def test_status_reads_the_engines_metrics_port_from_the_chart_by_default(
    fake_api, kubeconfig, capsys
):
    # No --metrics-port: Ray's 8080 and the chart's serve.metricsPort (9400, from the
    # RayService's serveConfigV2) are both read, so the Engines' own export is counted.
    api, _ = fake_api
    _pods_and_exports(api, _live())
    assert _status(kubeconfig) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"load\s+engine\s+yes\s+queue depth internal 0, pro 1, free 12; shed pro 0, free 40", out
    ), out
    assert any("/pods/attention-b:9400/proxy/metrics" in unquote(r) for r in api.requests)


def test_status_without_an_engine_metrics_port_reads_rays_only(fake_api, kubeconfig, capsys):
    # A release rendered with serve.metricsPort null: only Ray's export is read, and what the
    # Engines would have served is not counted (nor asked for).
    api, _ = fake_api
    objects = _live()
    rayservice = _get(objects, "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    del config["applications"][0]["args"]["metrics_port"]
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    _pods_and_exports(api, objects)
    assert _status(kubeconfig) == 0
    out = capsys.readouterr().out
    assert re.search(r"load\s+engine\s+yes\s+queue depth pro 1, free 7; shed free 30", out), out
    assert not any(":9400/" in unquote(r) for r in api.requests)


def test_explicit_metrics_ports_replace_the_defaults(fake_api, kubeconfig, capsys):
    api, _ = fake_api
    _pods_and_exports(api, _live())
    assert _status(kubeconfig, "--metrics-port", "9400") == 0
    out = capsys.readouterr().out
    assert re.search(
        r"load\s+engine\s+yes\s+queue depth internal 0, free 5; shed pro 0, free 10", out
    )
    assert not any(":8080/" in unquote(r) for r in api.requests)


@pytest.mark.parametrize(
    ("serve_config", "expected"),
    [
        ({"applications": [{"name": "dsv2", "args": {"metrics_port": 9400}}]}, (8080, 9400)),
        ({"applications": [{"name": "dsv2", "args": {"metrics_port": 8080}}]}, (8080,)),
        ({"applications": [{"name": "dsv2", "args": {}}]}, (8080,)),
        ({"applications": [{"name": "dsv2", "args": {"metrics_port": "x"}}]}, (8080,)),
        ({"applications": []}, (8080,)),
        ("not: [valid", (8080,)),
    ],
)
def test_default_metrics_ports_degrade_to_rays_export(serve_config, expected) -> None:
    text = serve_config if isinstance(serve_config, str) else yaml.safe_dump(serve_config)
    rayservice = {"metadata": {"name": "x"}, "spec": {"serveConfigV2": text}}
    assert default_metrics_ports(rayservice) == expected
