"""`dsv2 k8s`: inspect a Kubernetes deployment of the dsv2 chart.

    dsv2 k8s status --release chat [--namespace prod] [--wait 600] [--output json]
    dsv2 k8s smoke --url http://chat-dsv2-gateway:8000

`status` also shows the model plane's load: Serve replicas per deployment (running/target),
queue depth per tier and shed requests (informational rows, never unready for a missing
source). It exits 0 when the RayService, its Serve application, the gateway and Redis are all
ready, 1 when something is not (or not found), 2 when the API cannot be read.
`smoke` exits 0 when the gateway is healthy and completes one chat request, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_API_ERROR = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", metavar="SUBCOMMAND", required=True)

    status = sub.add_parser(
        "status", help="readiness of a release (RayService, Serve, gateway, Redis)"
    )
    status.add_argument("--release", required=True, help="Helm release name")
    status.add_argument(
        "--namespace", "-n", default=None, help="namespace (default: the kubeconfig context's)"
    )
    status.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config; in-cluster when run in a pod)",
    )
    status.add_argument("--context", default=None, help="kubeconfig context")
    status.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="poll until ready or SECONDS have passed (default: check once)",
    )
    status.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    status.add_argument("--output", "-o", choices=["table", "json"], default="table")
    status.add_argument(
        "--metrics-port",
        type=int,
        action="append",
        default=None,
        help="port of the Ray pods' Prometheus metrics to read queue depth and shed requests "
        "from (repeatable; default: Ray's export port 8080 plus the Engines' metrics_port "
        "read from the RayService's serveConfigV2)",
    )
    status.set_defaults(_k8s_run=_run_status)

    smoke = sub.add_parser("smoke", help="gateway health plus one chat completion (helm test)")
    smoke.add_argument("--url", required=True, help="gateway base URL, e.g. http://host:8000")
    smoke.add_argument("--max-tokens", type=int, default=8)
    smoke.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for readiness and the reply"
    )
    smoke.add_argument(
        "--api-key", default=os.environ.get("DSV2_API_KEY"), help="Bearer key (default: anonymous)"
    )
    smoke.set_defaults(_k8s_run=_run_smoke)


def run(args: argparse.Namespace) -> int:
    return int(args._k8s_run(args))


def _api_client(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An ApiClient and the default namespace: in-cluster in a pod, else from a kubeconfig."""
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        namespace_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        namespace = namespace_file.read_text().strip() if namespace_file.is_file() else "default"
        return client.ApiClient(configuration), namespace
    api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    if context is not None:
        contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
        active = next((c for c in contexts if c["name"] == context), active)
    namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return api_client, namespace


def _run_status(args: argparse.Namespace) -> int:
    from services.k8s import status as st

    try:
        api_client, default_namespace = _api_client(args.kubeconfig, args.context)
    except Exception as exc:  # kubeconfig missing or malformed: say so, no traceback
        print(f"error: cannot load Kubernetes configuration: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    namespace = args.namespace or default_namespace
    deadline = time.monotonic() + max(args.wait, 0.0)
    with api_client:
        while True:
            try:
                ports = tuple(args.metrics_port) if args.metrics_port else None
                statuses = st.fetch(api_client, args.release, namespace, ports)
            except st.ApiError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_API_ERROR
            ready = all(s.ready for s in statuses)
            if ready or time.monotonic() + args.interval > deadline:
                break
            time.sleep(args.interval)
    if args.output == "json":
        print(st.as_json(statuses))
    else:
        print(
            f"release {args.release} in namespace {namespace}: {'READY' if ready else 'NOT READY'}"
        )
        print(st.as_table(statuses))
    return EXIT_READY if ready else EXIT_NOT_READY


def _run_smoke(args: argparse.Namespace) -> int:
    from services.k8s.smoke import SmokeError, smoke

    try:
        reply = smoke(
            args.url, max_tokens=args.max_tokens, timeout=args.timeout, api_key=args.api_key
        )
    except SmokeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"ok: gateway healthy, chat completion returned {reply!r}")
    return 0
