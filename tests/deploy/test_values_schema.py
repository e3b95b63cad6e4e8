"""values.schema.json describes every value and refuses bad ones with a message naming the
field; checks the schema cannot express fail the render with a message naming the fields."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.deploy.conftest import CHART_DIR, SCENARIOS, load_values, render

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def _leaves(values: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(values, dict) and values:
        return [leaf for key, value in values.items() for leaf in _leaves(value, (*path, key))]
    return [path]


def _schema_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    for key in path:
        if key in schema.get("properties", {}):
            schema = schema["properties"][key]
        elif isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]
        else:
            return None
    return schema


def test_schema_describes_every_default_value() -> None:
    missing = [".".join(p) for p in _leaves(DEFAULTS) if _schema_at(SCHEMA, p) is None]
    assert missing == []
    # ... and knows no value that values.yaml lacks (a stale schema).
    for key in SCHEMA["properties"]:
        assert key in DEFAULTS or key == "global", key


def test_chart_level_objects_refuse_unknown_keys() -> None:
    def walk(schema: dict[str, Any], path: str) -> None:
        if "properties" in schema and path.count(".") < 2:
            passthrough = path.endswith(("podSecurityContext", "containerSecurityContext"))
            if not passthrough:
                assert schema.get("additionalProperties") is False, path
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{path}.{key}")

    walk(SCHEMA, "")


def test_defaults_and_examples_pass_the_schema(scenario: str) -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(load_values(SCENARIOS[scenario]))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"gateway": {"httpPort": 70000}}, "/gateway/httpPort"),
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
        (
            {"gateway": {"resources": {"requests": {"cpu": "lots"}}}},
            "/gateway/resources/requests/cpu",
        ),
        ({"gatway": {}}, "'gatway' not allowed"),
        ({"rayCluster": {"attention": {"gpu": 2}}}, "'gpu' not allowed"),
        (
            {"rayCluster": {"expert": {"rayResource": "not a name"}}},
            "/rayCluster/expert/rayResource",
        ),
        ({"model": {"source": "s3"}}, "/model/source"),
        ({"model": {"source": "pvc"}}, "/model/pvc/claimName"),
        ({"serve": {"engine": {"dtype": "int3"}}}, "/serve/engine/dtype"),
        ({"serve": {"engine": {"device": "tpu"}}}, "/serve/engine/device"),
        ({"model": {"dtype": "bfloat16"}}, "'dtype' not allowed"),
        ({"serve": {"engineReplicas": 0}}, "/serve/engineReplicas"),
        ({"serve": {"routing": {"policy": "random"}}}, "/serve/routing/policy"),
        ({"serve": {"routing": {"maxImbalance": -1}}}, "/serve/routing/maxImbalance"),
        (
            {"serve": {"engineAutoscaling": {"minReplicas": 0}}},
            "/serve/engineAutoscaling/minReplicas",
        ),
        ({"redis": {"enabled": False}}, "/externalRedis"),
        ({"externalRedis": {"url": "redis://:hunter2@redis:6379/0"}}, "/externalRedis/url"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        (
            {"containerSecurityContext": {"privileged": True}},
            "/containerSecurityContext/privileged",
        ),
        (
            {"gateway": {"tiers": {"free": {"requests_per_minute": -1}}}},
            "/gateway/tiers/free/requests_per_minute",
        ),
        (
            {"gateway": {"tiers": {"free": {"priority": "platinum"}}}},
            "/gateway/tiers/free/priority",
        ),
        ({"serve": {"engine": {"max_waiting_requests": -1}}}, "/serve/engine/max_waiting_requests"),
        ({"serve": {"engine": {"shed_priorities": ["gold"]}}}, "/serve/engine/shed_priorities/0"),
        (
            {"gateway": {"tiers": {"free": {"models": {"dsv2-vl": {"tokens_a_day": 5}}}}}},
            "'tokens_a_day' not allowed",
        ),
        (
            {"gateway": {"pdb": {"enabled": True, "minAvailable": "half"}}},
            "/gateway/pdb/minAvailable",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_field(values: dict[str, Any], expected: str) -> None:
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema(values)
    assert expected in str(info.value)
    # Rendering (what `helm install` does) refuses them too.
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"rayCluster": {"attention": {"minReplicas": 3, "maxReplicas": 2, "replicas": 2}}},
            "rayCluster.attention.minReplicas (3) must not exceed rayCluster.attention.maxReplicas (2)",
        ),
        (
            {"rayCluster": {"expert": {"replicas": 5}}},
            "rayCluster.expert.replicas (5) must lie within",
        ),
        ({"serve": {"engineReplicas": 3}}, "serve.engineReplicas (3) needs more room"),
        (
            {"serve": {"engineAutoscaling": {"enabled": True, "maxReplicas": 2}}},
            "serve.engineAutoscaling.maxReplicas (2) needs more room",
        ),
        (
            {"serve": {"engineAutoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}},
            "serve.engineAutoscaling.minReplicas (3) is above maxReplicas (2)",
        ),
        ({"serve": {"numExpertShards": 4}}, "serve.numExpertShards (4) needs more room"),
        (
            {"rayCluster": {"expert": {"enabled": False}}},
            "serve.numExpertShards is 1 but rayCluster.expert.enabled is false",
        ),
        (
            {"serve": {"engine": {"device": "cuda"}, "engineDeployment": {"numGpus": 0}}},
            "serve.engine.device is cuda but serve.engineDeployment.numGpus is 0",
        ),
        (
            {"serve": {"engine": {"device": "cpu"}}},
            "serve.engine.device is cpu but serve.engineDeployment.numGpus is 1",
        ),
    ],
)
def test_inconsistent_values_fail_the_render_naming_the_fields(
    values: dict[str, Any], expected: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as info:
        render(values)
    assert expected in str(info.value)
