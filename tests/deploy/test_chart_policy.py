"""Policy and wiring checks on the rendered chart: what an operator reviewing the manifests
would check by hand (resources, probes, non-root, secrets, network isolation, labels), and
that the parts point at each other (gateway -> Serve gRPC service, Redis; Serve app args ->
worker-group resources)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
from typing import Any

import yaml

from tests.deploy.conftest import (
    CHART_DIR,
    RELEASE,
    find,
    parse,
    pod_specs,
    render,
    rendered,
)

RECOMMENDED_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|CREDENTIAL)", re.IGNORECASE)
# A secret set in a config file: `requirepass x`, `password: x`, `"token": "x"`, ...
SECRET_SETTING = re.compile(
    r"requirepass\s+\S|(password|secret|token)[\"']?\s*[:=]\s*[\"']?\w", re.IGNORECASE
)


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("container", c) for c in spec.get("containers", [])] + [
        ("initContainer", c) for c in spec.get("initContainers", [])
    ]


def test_every_container_declares_cpu_and_memory(scenario: str) -> None:
    for obj in rendered(scenario):
        for where, _, spec in pod_specs(obj):
            for kind, container in _containers(spec):
                resources = container.get("resources", {})
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources.get(bound, {})), (
                        f"{where} {kind} {container['name']} lacks {bound}"
                    )


def test_every_container_has_readiness_and_liveness_probes(scenario: str) -> None:
    # Init containers cannot carry probes (the API rejects them); they run to completion.
    for obj in rendered(scenario):
        for where, _, spec in pod_specs(obj):
            for container in spec["containers"]:
                assert "readinessProbe" in container, f"{where} {container['name']}"
                assert "livenessProbe" in container, f"{where} {container['name']}"


def test_every_pod_runs_as_non_root_without_privilege(scenario: str) -> None:
    for obj in rendered(scenario):
        for where, _, spec in pod_specs(obj):
            pod_context = spec.get("securityContext", {})
            assert pod_context.get("runAsNonRoot") is True, where
            assert pod_context.get("runAsUser", 0) > 0, where
            assert spec.get("automountServiceAccountToken") is False, where
            for kind, container in _containers(spec):
                context = container.get("securityContext", {})
                name = f"{where} {kind} {container['name']}"
                assert context.get("allowPrivilegeEscalation") is False, name
                assert context.get("capabilities", {}).get("drop") == ["ALL"], name
                assert context.get("readOnlyRootFilesystem") is True, name
                # A read-only root still needs a writable /tmp for Python, Ray and Redis.
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, name


def test_secrets_stay_out_of_configmaps_and_plain_env(scenario: str) -> None:
    objects = rendered(scenario)
    secret_values = {
        base64.b64decode(v).decode()
        for s in find(objects, "Secret")
        for v in (s.get("data") or {}).values()
    }
    for config_map in find(objects, "ConfigMap"):
        text = json.dumps(config_map.get("data", {}))
        assert not any(value in text for value in secret_values), config_map["metadata"]["name"]
        assert not SECRET_SETTING.search(text), config_map["metadata"]["name"]
    for obj in objects:
        for where, _, spec in pod_specs(obj):
            for _, container in _containers(spec):
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "valueFrom" in env, f"{where}: {env['name']} is a literal"
                    value = env.get("value", "")
                    assert not any(s in value for s in secret_values), f"{where}: {env['name']}"


def test_default_values_hold_no_secret() -> None:
    # Generated secrets: two installs get different keys, none of which is in values.yaml.
    first = {s["metadata"]["name"]: s["data"] for s in find(rendered("default"), "Secret")}
    second = {s["metadata"]["name"]: s["data"] for s in find(parse(render()), "Secret")}
    assert set(first) == {f"{RELEASE}-dsv2-gateway", f"{RELEASE}-dsv2-redis"}
    for name in first:
        assert first[name] != second[name], name
        (value,) = first[name].values()
        assert len(base64.b64decode(value)) >= 32


def test_existing_secrets_are_used_instead_of_generated_ones() -> None:
    values = {
        "gateway": {"cookieSecret": {"existingSecret": "my-cookie", "key": "k"}},
        "redis": {"auth": {"existingSecret": "my-redis", "key": "pw"}},
    }
    objects = parse(render(values))
    assert find(objects, "Secret") == []
    text = json.dumps(objects)
    assert '"name": "my-cookie", "key": "k"' in text
    assert '"name": "my-redis", "key": "pw"' in text


def test_every_object_and_pod_carries_the_recommended_labels(scenario: str) -> None:
    for obj in rendered(scenario):
        labels = obj["metadata"].get("labels", {})
        for label in RECOMMENDED_LABELS:
            assert label in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks {label}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        for where, metadata, _ in pod_specs(obj):
            for label in RECOMMENDED_LABELS:
                assert label in metadata.get("labels", {}), f"{where} pods lack {label}"


# --- network isolation ---------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _pod_labels(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    pods = {}
    for obj in objects:
        for where, metadata, _ in pod_specs(obj):
            pods[
                where
                if where.startswith("ray")
                else obj["metadata"]["labels"]["app.kubernetes.io/component"]
            ] = metadata["labels"]
    return pods


def _allowed(objects: list[dict[str, Any]], source: str, target: str, port: int) -> bool:
    """Whether the chart's NetworkPolicies let pod `source` reach pod `target` on `port`
    (same namespace)."""
    pods = _pod_labels(objects)
    policies = [
        p
        for p in find(objects, "NetworkPolicy")
        if _selects(p["spec"]["podSelector"], pods[target])
    ]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    if _selects(peer["podSelector"], pods[source]):
                        return True
    return False


def test_only_the_gateway_reaches_redis_and_the_serve_ports() -> None:
    objects = rendered("default")
    assert len(find(objects, "NetworkPolicy")) == 3
    assert _allowed(objects, "gateway", "redis", 6379)
    assert _allowed(objects, "gateway", "ray head", 9000)
    assert _allowed(objects, "gateway", "ray attention", 9000)
    assert not _allowed(objects, "gateway", "ray head", 6379)  # GCS
    assert not _allowed(objects, "gateway", "ray head", 8265)  # dashboard
    for other in ("test", "ray attention", "ray expert"):
        assert not _allowed(objects, other, "redis", 6379), other
    assert not _allowed(objects, "test", "ray attention", 9000)
    # Ray pods talk to each other on any port (GCS, object store, the expert data plane).
    assert _allowed(objects, "ray attention", "ray expert", 9100)
    assert _allowed(objects, "ray expert", "ray head", 6379)
    # The helm test pod reaches the gateway.
    assert _allowed(objects, "test", "gateway", 8000)


def test_restricted_gateway_ingress_still_admits_the_test_pod() -> None:
    objects = rendered("v2-236b-multinode")
    (policy,) = [
        p for p in find(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("gateway")
    ]
    peers = policy["spec"]["ingress"][0]["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    } in peers
    assert _allowed(objects, "test", "gateway", 8000)
    # External Redis: no Redis policy, StatefulSet or Secret.
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]


# --- wiring between the parts ---------------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (rayservice,) = find(objects, "RayService")
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def test_gateway_dials_the_serve_grpc_service(scenario: str) -> None:
    objects = rendered(scenario)
    (rayservice,) = find(objects, "RayService")
    (deployment,) = find(objects, "Deployment", "gateway")
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    service = rayservice["spec"]["serveService"]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "serve-grpc")
    assert env["DSV2_MODEL_TARGET"] == f"{service['metadata']['name']}:{grpc_port}"
    config = _serve_config(objects)
    assert config["grpc_options"]["port"] == grpc_port
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "services.rpc.dsv2.v1.inference_pb2_grpc.add_InferenceServicer_to_server"
    ]
    assert env["DSV2_MODEL_APP"] == config["applications"][0]["name"] == "dsv2"
    assert config["applications"][0]["import_path"] == "services.serving.app:build_app"
    assert env["DSV2_TIERS_FILE"].startswith("/etc/dsv2/")
    assert env["DSV2_COOKIE_SECRET"]["secretKeyRef"]["name"]
    assert "DSV2_REDIS_URL" in env


def _gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(objects, "Deployment", "gateway")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_gateway_settings_read_from_the_rendered_env(scenario, monkeypatch) -> None:
    # The gateway's own Settings class, fed the environment a pod would get (secret refs
    # replaced by a stand-in, $(VAR) expanded as the kubelet does).
    from services.gateway.settings import Settings

    objects = rendered(scenario)
    container = _gateway_container(objects)
    env: dict[str, str] = {}
    for item in container["env"]:
        value = item["value"] if "value" in item else f"secret-{item['name'].lower()}"
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    for name in [n for n in list(os.environ) if n.startswith("DSV2_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", ports["http"])
    assert (settings.grpc_host, settings.grpc_port) == ("0.0.0.0", ports["grpc"])
    assert settings.cookie_secret.get_secret_value() == "secret-dsv2_cookie_secret"
    assert settings.redis_url.startswith(("redis://", "secret-"))
    assert str(settings.tiers_file) == env["DSV2_TIERS_FILE"]
    (service,) = find(objects, "Service", "gateway")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_tiers_configmap_loads_in_the_gateway(tmp_path) -> None:
    from services.gateway.core.tiers import load_tiers

    objects = rendered("default")
    container = _gateway_container(objects)
    tiers_file = next(e["value"] for e in container["env"] if e["name"] == "DSV2_TIERS_FILE")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tiers")
    (deployment,) = find(objects, "Deployment", "gateway")
    volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tiers"
    )
    (config_map,) = [
        c
        for c in find(objects, "ConfigMap")
        if c["metadata"]["name"] == volume["configMap"]["name"]
    ]
    filename = tiers_file.removeprefix(mount["mountPath"] + "/")
    (tmp_path / filename).write_text(config_map["data"][filename])
    tiers = load_tiers(tmp_path / filename)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["gateway"]["tiers"]
    for name, limits in defaults.items():
        assert tiers[name].model_dump(exclude={"name"}) == {"models": {}, **limits}


def test_serve_app_args_pass_the_model_plane_config(scenario) -> None:
    # The Serve builder validates its args with this model before building any replica.
    from services.serving.config import ModelPlaneConfig

    objects = rendered(scenario)
    app = _serve_config(objects)["applications"][0]
    config = ModelPlaneConfig.model_validate(app["args"])
    # Engines and shards sit in different pods: shards must listen beyond loopback.
    assert config.shard_host == "0.0.0.0"
    assert config.model_path.startswith(_models_mount(objects))


def _models_mount(objects: list[dict[str, Any]]) -> str:
    (rayservice,) = find(objects, "RayService")
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    (mount,) = [
        m
        for m in group["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == "models"
    ]
    return mount["mountPath"] + "/"


def test_schema_lists_exactly_the_engine_options() -> None:
    from services.engine.params import EngineOptions

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    engine = schema["properties"]["serve"]["properties"]["engine"]
    assert set(engine["properties"]) == set(EngineOptions.__dataclass_fields__)


def test_schema_lists_exactly_the_routing_and_autoscaling_keys() -> None:
    from services.serving.config import EngineAutoscaling, RoutingConfig

    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(w.capitalize() for w in rest)

    serve = json.loads((CHART_DIR / "values.schema.json").read_text())["properties"]["serve"]
    routing = serve["properties"]["routing"]["properties"]
    assert set(routing) == {camel(f) for f in RoutingConfig.model_fields}
    autoscaling = serve["properties"]["engineAutoscaling"]["properties"]
    assert set(autoscaling) == {"enabled"} | {camel(f) for f in EngineAutoscaling.model_fields}


def test_engine_autoscaling_reaches_serve_and_kuberay() -> None:
    objects = rendered("v2-236b-multinode")
    args = _serve_config(objects)["applications"][0]["args"]
    assert "engine_replicas" not in args  # Serve refuses num_replicas with autoscaling
    assert args["engine_autoscaling"] == {
        "min_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
        "upscale_delay_s": 30,
        "downscale_delay_s": 900,
    }
    assert args["routing"]["policy"] == "prefix_affinity"
    from services.serving.app import engine_options
    from services.serving.config import ModelPlaneConfig

    options = engine_options(ModelPlaneConfig.model_validate(args))
    assert options["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in options
    router = options["request_router_config"]["request_router_class"]
    assert router == "services.serving.router:PrefixAffinityRouter"
    (rayservice,) = find(objects, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # The defaults keep a fixed replica count.
    default = _serve_config(rendered("default"))["applications"][0]["args"]
    assert default["engine_replicas"] == 1 and "engine_autoscaling" not in default


def test_gateway_hpa_scales_on_cpu() -> None:
    (hpa,) = find(rendered("v2-236b-multinode"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (4, 32)


def test_builtin_redis_url_uses_the_password_secret() -> None:
    objects = rendered("default")
    (deployment,) = find(objects, "Deployment", "gateway")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    # $(REDIS_PASSWORD) only expands when the variable is defined earlier in the list.
    assert names.index("REDIS_PASSWORD") < names.index("DSV2_REDIS_URL")
    url = next(e["value"] for e in env if e["name"] == "DSV2_REDIS_URL")
    (service,) = find(objects, "Service", "redis")
    assert url == f"redis://:$(REDIS_PASSWORD)@{service['metadata']['name']}:6379/0"
    (statefulset,) = find(objects, "StatefulSet", "redis")
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "appendonly yes" in find(objects, "ConfigMap", "redis")[0]["data"]["redis.conf"]
    assert "$REDIS_PASSWORD" not in " ".join(redis["command"][:2])
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_external_redis_url_comes_from_its_secret() -> None:
    objects = rendered("v2-236b-multinode")
    (deployment,) = find(objects, "Deployment", "gateway")
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["DSV2_REDIS_URL"] == {"secretKeyRef": {"name": "dsv2-redis", "key": "redis-url"}}
    assert deployment["metadata"]["annotations"]["dsv2.io/redis"] == "external"


def _ray_resources(group: dict[str, Any]) -> dict[str, int]:
    # What `ray start` receives after KubeRay writes `--resources=<value>` into a bash command.
    (arg,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    return json.loads(arg.removeprefix("--resources="))


def test_serve_replicas_land_on_their_own_worker_groups(scenario: str) -> None:
    objects = rendered(scenario)
    (rayservice,) = find(objects, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    args = _serve_config(objects)["applications"][0]["args"]
    (engine_resource,) = args["engine_deployment"]["resources"]
    attention = _ray_resources(groups["attention"])
    assert set(attention) == {engine_resource}
    replicas_room = attention[engine_resource] * groups["attention"]["maxReplicas"]
    autoscaling = args.get("engine_autoscaling")
    most = autoscaling["max_replicas"] if autoscaling else args["engine_replicas"]
    assert most <= replicas_room
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    if args["num_expert_shards"] > 0:
        (shard_resource,) = args["shard_deployment"]["resources"]
        expert = _ray_resources(groups["expert"])
        assert set(expert) == {shard_resource} and shard_resource != engine_resource
        assert args["num_expert_shards"] <= expert[shard_resource] * groups["expert"]["maxReplicas"]
    else:
        assert "expert" not in groups
    # GPUs requested by the pods cover what the deployments ask of Ray.
    for name, group in groups.items():
        container = group["template"]["spec"]["containers"][0]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        deployment = args["engine_deployment" if name == "attention" else "shard_deployment"]
        (resource,) = deployment["resources"]
        slots = _ray_resources(group)[resource]
        assert gpus >= deployment["num_gpus"] * slots, name


def test_236b_example_runs_eight_expert_shards_across_nodes() -> None:
    objects = rendered("v2-236b-multinode")
    args = _serve_config(objects)["applications"][0]["args"]
    assert args["num_expert_shards"] == 8
    assert args["model_path"] == "/models/DeepSeek-V2-Chat"
    (rayservice,) = find(objects, "RayService")
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["expert"]["replicas"] * _ray_resources(groups["expert"])["dsv2_expert"] == 8
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    volume = next(
        v for v in groups["expert"]["template"]["spec"]["volumes"] if v["name"] == "models"
    )
    assert volume["persistentVolumeClaim"] == {"claimName": "deepseek-v2-weights", "readOnly": True}


def test_download_mode_fetches_weights_before_ray_starts() -> None:
    objects = rendered("v2-lite-single-gpu")
    (rayservice,) = find(objects, "RayService")
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    (init,) = spec["initContainers"]
    args = _serve_config(objects)["applications"][0]["args"]
    assert init["command"][:3] == ["python", "-m", "services.k8s.download"]
    assert init["command"][init["command"].index("--dest") + 1] == args["model_path"]
    assert args["num_expert_shards"] == 0


def test_helm_test_hook_runs_the_smoke_check() -> None:
    (pod,) = find(rendered("default"), "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["dsv2", "k8s", "smoke"]
    (service,) = find(rendered("default"), "Service", "gateway")
    assert command[command.index("--url") + 1] == f"http://{service['metadata']['name']}:8000"
