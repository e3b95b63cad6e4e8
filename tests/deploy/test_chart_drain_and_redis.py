"""The chart's side of the gateway's graceful drain (termination grace and preStop match the
drain's grace) and of bounded storage (sessions in a Redis of their own whose eviction policy
cannot reach API keys or quotas; an external Redis still works, with or without a separate
sessions URL)."""

from __future__ import annotations

from typing import Any

from services.gateway.settings import Settings
from tests.deploy.conftest import find, parse, render, rendered
from tests.deploy.test_chart_policy import _allowed, _env


def _gateway(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = find(objects, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_termination_grace_covers_prestop_and_the_drain() -> None:
    pod, container = _gateway(rendered("default"))
    env = _env(container)
    # The gateway reads its grace from the env the chart sets (default values: 20 s, 5 s).
    assert Settings(drain_grace_s=env["DSV2_DRAIN_GRACE_S"]).drain_grace_s == 20
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 20 + 15

    objects = parse(render({"gateway": {"drain": {"graceSeconds": 42.5, "preStopSeconds": 0}}}))
    pod, container = _gateway(objects)
    assert _env(container)["DSV2_DRAIN_GRACE_S"] == "42.5"
    assert "lifecycle" not in container
    assert pod["terminationGracePeriodSeconds"] == 43 + 15


def test_sessions_have_their_own_evicting_redis_apart_from_keys_and_quotas() -> None:
    objects = rendered("default")
    (config,) = find(objects, "ConfigMap", "redis")
    main = config["data"]["redis.conf"]
    sessions = config["data"]["sessions.conf"]
    assert "maxmemory-policy noeviction" in main and "port 6379" in main
    assert "maxmemory-policy allkeys-lru" in sessions and "port 6380" in sessions
    assert "maxmemory 768mb" in sessions and "maxmemory 256mb" in main
    (statefulset,) = find(objects, "StatefulSet", "redis")
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["redis", "sessions"]
    assert "sessions.conf" in containers[1]["command"][-1]
    data = next(m for m in containers[1]["volumeMounts"] if m["name"] == "data")
    assert data["subPath"] == "sessions"  # its own AOF, beside the main server's
    (service,) = find(objects, "Service", "redis")
    assert {p["port"] for p in service["spec"]["ports"]} == {6379, 6380}
    _, gateway = _gateway(objects)
    env = _env(gateway)
    name = service["metadata"]["name"]
    assert env["DSV2_SESSIONS_REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@{name}:6380/0"
    assert _allowed(objects, "gateway", "redis", 6380)
    for other in ("test", "ray attention", "ray expert"):
        assert not _allowed(objects, other, "redis", 6380), other


def test_external_redis_with_and_without_a_sessions_url() -> None:
    off = {"redis": {"enabled": False}}
    one = parse(render({**off, "externalRedis": {"url": "redis://cache:6379/0"}}))
    env = _env(_gateway(one)[1])
    assert env["DSV2_REDIS_URL"] == "redis://cache:6379/0"
    assert "DSV2_SESSIONS_REDIS_URL" not in env  # one Redis for everything
    two = parse(
        render(
            {
                **off,
                "externalRedis": {
                    "url": "redis://cache:6379/0",
                    "sessionsUrl": "redis://sessions:6379/0",
                },
            }
        )
    )
    assert _env(_gateway(two)[1])["DSV2_SESSIONS_REDIS_URL"] == "redis://sessions:6379/0"
    secret = parse(
        render(
            {
                **off,
                "externalRedis": {"existingSecret": "urls", "sessionsUrlKey": "sessions-url"},
            }
        )
    )
    assert _env(_gateway(secret)[1])["DSV2_SESSIONS_REDIS_URL"] == {
        "secretKeyRef": {"name": "urls", "key": "sessions-url"}
    }
