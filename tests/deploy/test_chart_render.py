"""The chart renders into objects a current Kubernetes API server (and KubeRay) would accept:
Helm lint, kubernetes-validate in strict mode, the KubeRay CRD schemas, and the typed models
of the `kubernetes` client. Everything is offline: there is no cluster here."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient

from tests.deploy.conftest import (
    CHART_DIR,
    CRD_DIR,
    NAMESPACE,
    SCENARIOS,
    find,
    load_values,
    parse,
    render,
    rendered,
    strip,
)

# The newest Kubernetes the validator knows, and the oldest the chart supports (Chart.yaml).
KUBE_VERSIONS = [kubernetes_validate.latest_version(), "1.29.0"]


def test_lint_has_no_errors(scenario: str) -> None:
    # lint() reports problems as data and never raises: fail on its errors ourselves.
    report = helm.lint(
        CHART_DIR, load_values(SCENARIOS[scenario]), strict=True, kube_version="v1.33.0"
    )
    # Severity 2 is a warning, 3 an error; only the "icon is recommended" info may remain.
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1
    assert errors == [], errors


def test_renders_the_expected_objects(scenario: str) -> None:
    kinds = {o["kind"] for o in rendered(scenario)}
    assert {"RayService", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "Pod"} <= kinds


def test_names_fit_kubernetes_and_kuberay_limits_for_the_longest_release_name() -> None:
    # Helm allows 53 characters. KubeRay refuses RayService names over 47 characters (it
    # appends "-xxxxx" for the RayCluster, whose longest Service suffix is "-serve-svc"), and
    # names must be DNS-1035 labels; every other name must fit 63.
    release = "a-very-long-release-name-that-uses-all-53-characters"[:53]
    objects = parse(render(name=release))
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    (rayservice,) = find(objects, "RayService")
    name = rayservice["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert len(rayservice["spec"]["serveService"]["metadata"]["name"]) <= 63


def _pods_inside_rayservice(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The head and worker pod templates as standalone Pods, so they get the core-API checks."""
    cluster = obj["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster.get("workerGroupSpecs", [])
    ]
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "ray-pod", **t.get("metadata", {})},
            "spec": t["spec"],
        }
        for t in templates
    ]


def _serve_service(obj: dict[str, Any]) -> dict[str, Any]:
    svc = copy.deepcopy(obj["spec"]["serveService"])
    return {"apiVersion": "v1", "kind": "Service", **svc}


def _core_objects(scenario: str) -> list[dict[str, Any]]:
    objects = []
    for obj in rendered(scenario):
        if obj["kind"] == "RayService":
            objects += _pods_inside_rayservice(obj)
            objects.append(_serve_service(obj))
        else:
            objects.append(strip(obj))
    return objects


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_passes_kubernetes_validate_strict(scenario: str, kube_version: str) -> None:
    failures = []
    for obj in _core_objects(scenario):
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(
                f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
    assert failures == []


def test_strict_validation_rejects_unknown_fields() -> None:
    # The check above has teeth: a misspelt field is an error, not silently dropped.
    deployment = strip(find(rendered("default"), "Deployment", "gateway")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


# --- KubeRay CRDs ------------------------------------------------------------------------------


def _forbid_unknown_fields(schema: Any) -> Any:
    """Like the API server's strict field validation: an object schema that lists its properties
    (and does not say `x-kubernetes-preserve-unknown-fields`) accepts no other key."""
    if isinstance(schema, dict):
        schema = {k: _forbid_unknown_fields(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_forbid_unknown_fields(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(filename: str, version: str = "v1") -> jsonschema.Draft7Validator:
    # The C loader: the CRD files are ~1 MB each.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / filename).read_text(), Loader=loader)
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _forbid_unknown_fields(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _crd_errors(validator: jsonschema.Draft7Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{e.message} at {'/'.join(map(str, e.path))}" for e in validator.iter_errors(obj)]


def test_rayservice_passes_the_kuberay_crd_schema(scenario: str) -> None:
    (rayservice,) = find(rendered(scenario), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert _crd_errors(_crd_validator("ray.io_rayservices.yaml"), strip(rayservice)) == []


def test_raycluster_spec_passes_the_kuberay_crd_schema(scenario: str) -> None:
    (rayservice,) = find(rendered(scenario), "RayService")
    raycluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rayservice["metadata"]["name"], "namespace": NAMESPACE},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    assert _crd_errors(_crd_validator("ray.io_rayclusters.yaml"), raycluster) == []


def test_crd_check_rejects_unknown_fields() -> None:
    rayservice = strip(find(rendered("default"), "RayService")[0])
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    assert _crd_errors(_crd_validator("ray.io_rayservices.yaml"), rayservice)


# --- typed models of the kubernetes client ------------------------------------------------------

MODEL_CLASSES = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Pod"): "V1Pod",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
    ("networking.k8s.io/v1", "Ingress"): "V1Ingress",
}


def test_every_object_deserializes_into_typed_models(scenario: str) -> None:
    api = ApiClient()
    for obj in _core_objects(scenario):
        model_class = MODEL_CLASSES[(obj["apiVersion"], obj["kind"])]
        # The client's own deserializer, as used on API responses; client-side validation
        # raises on a missing required field.
        model = api._ApiClient__deserialize(obj, model_class)
        assert type(model).__name__ == model_class
        # Round trip: a field the typed model does not know would be dropped here.
        assert api.sanitize_for_serialization(model) == obj, f"{obj['kind']} lost fields"
