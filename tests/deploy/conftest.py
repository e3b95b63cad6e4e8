"""Render the chart offline (helm-python-sdk: Helm's Go SDK through ctypes; no helm binary, no
cluster) once per scenario and share the parsed objects between the deploy tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "dsv2"
EXAMPLES_DIR = CHART_DIR / "examples"
CRD_DIR = Path(__file__).resolve().parent / "crds"
RELEASE = "chat"
NAMESPACE = "dsv2"

# Scenario name -> values file (None: the chart's defaults).
SCENARIOS: dict[str, Path | None] = {
    "default": None,
    **{path.stem: path for path in sorted(EXAMPLES_DIR.glob("*.yaml"))},
}

Obj = dict[str, Any]


def load_values(path: Path | None) -> dict[str, Any]:
    return {} if path is None else yaml.safe_load(path.read_text())


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text (hooks such as the helm test pod included)."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values=values or {}, name=name, namespace=NAMESPACE, is_install=True)


def parse(manifests: dict[str, str]) -> list[Obj]:
    objects: list[Obj] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["__template__"] = path
                objects.append(doc)
    return objects


def strip(obj: Obj) -> Obj:
    """The object as the API server would receive it (without our bookkeeping key, and without
    the empty annotations map parse() adds)."""
    clean = copy.deepcopy(obj)
    clean.pop("__template__", None)
    if not clean["metadata"].get("annotations"):
        clean["metadata"].pop("annotations", None)
    return clean


_CACHE: dict[str, list[Obj]] = {}


def rendered(scenario: str) -> list[Obj]:
    if scenario not in _CACHE:
        _CACHE[scenario] = parse(render(load_values(SCENARIOS[scenario])))
    return copy.deepcopy(_CACHE[scenario])


def find(objects: list[Obj], kind: str, component: str | None = None) -> list[Obj]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (
            component is None
            or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def pod_specs(obj: Obj) -> list[tuple[str, Obj, Obj]]:
    """(where, pod metadata, pod spec) for every pod an object would create."""
    kind = obj["kind"]
    if kind == "Pod":
        return [("Pod", obj["metadata"], obj["spec"])]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        template = obj["spec"]["template"]
        return [(kind, template.get("metadata", {}), template["spec"])]
    if kind == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]["template"]
        pods = [("ray head", head.get("metadata", {}), head["spec"])]
        for group in cluster.get("workerGroupSpecs", []):
            template = group["template"]
            pods.append(
                (f"ray {group['groupName']}", template.get("metadata", {}), template["spec"])
            )
        return pods
    return []


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> str:
    return request.param
