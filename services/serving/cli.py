"""`dsv2 model-plane`: a local Ray cluster (127.0.0.1) running the model plane until Ctrl-C.

dsv2 model-plane --model DIR [--num-expert-shards 2] [--engine-replicas 1] [--grpc-port 9000]
dsv2 model-plane --config plane.yaml   # the same dict `build_app` gets in serveConfigV2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from services.engine_args import (
    add_engine_arguments,
    add_shedding_arguments,
    engine_options_from,
)
from services.serving.config import APP_NAME, GRPC_PORT, HTTP_PORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--config", help="YAML/JSON file with build_app's args (flags override)")
    parser.add_argument("--model-id", help="name shown by /v1/models (default: folder name)")
    add_engine_arguments(parser)  # engine.device / engine.dtype of the config
    add_shedding_arguments(parser)
    parser.add_argument("--num-expert-shards", type=int, help="0 = experts in the engine")
    parser.add_argument("--engine-replicas", type=int)
    parser.add_argument("--shard-port-base", type=int, help="shard k listens on base+k (0: free)")
    parser.add_argument("--max-num-seqs", type=int, help="engine: concurrent sequences")
    parser.add_argument("--block-size", type=int, help="engine: KV cache block size")
    parser.add_argument("--cache-tokens", type=int, help="engine: KV cache capacity in tokens")
    parser.add_argument("--app-name", default=APP_NAME, help="Serve application name")
    parser.add_argument("--grpc-port", type=int, default=GRPC_PORT, help="Serve gRPC ingress")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT, help="Serve HTTP (unused)")
    parser.add_argument(
        "--num-cpus", type=float, default=None, help="logical CPUs of the local Ray cluster"
    )


def _load_config_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = _load_config_file(args.config) if args.config else {}
    flags = {
        "model_path": args.model,
        "model_id": args.model_id,
        "num_expert_shards": args.num_expert_shards,
        "engine_replicas": args.engine_replicas,
        "shard_port_base": args.shard_port_base,
    }
    config.update({k: v for k, v in flags.items() if v is not None})
    engine = dict(config.get("engine") or {})
    engine.update(engine_options_from(args))
    for key in ("max_num_seqs", "block_size", "cache_tokens"):
        if getattr(args, key) is not None:
            engine[key] = getattr(args, key)
    if engine:
        config["engine"] = engine
    return config


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from services.serving.config import ModelPlaneConfig
    from services.serving.local import reserve_local_gpu

    config = reserve_local_gpu(config_from_args(args))
    try:
        plane = ModelPlaneConfig.model_validate(config)
    except ValidationError as exc:
        print(f"error: invalid model-plane config:\n{exc}", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(plane.model_path, "config.json")):
        print(f"error: {plane.model_path} has no config.json", file=sys.stderr)
        return 2

    from services.serving.local import run_model_plane, start_local_serve, stop_local_serve

    # Logical CPUs are scheduling tokens: make sure every deployment fits, or serve.run would
    # wait forever for resources this machine's cluster can never offer.
    needed = (
        plane.min_engine_replicas * plane.engine_deployment.num_cpus
        + plane.num_expert_shards * plane.shard_deployment.num_cpus
    )
    num_cpus = args.num_cpus or max(float(os.cpu_count() or 2), needed)
    if needed > num_cpus:
        print(
            f"error: the deployments need {needed:g} CPUs but the cluster has {num_cpus:g}: "
            "raise --num-cpus or lower engine_deployment/shard_deployment num_cpus",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = start_local_serve(num_cpus=num_cpus, grpc_port=args.grpc_port, http_port=args.http_port)
    try:
        run_model_plane(config, args.app_name)
        print(
            f"model plane ready: dsv2.v1.Inference on {info.grpc_target} "
            f'(metadata "application: {args.app_name}"), {plane.num_expert_shards} expert '
            f"shards, {plane.min_engine_replicas} engine replicas"
            f"{' (autoscaled)' if plane.engine_autoscaling else ''}. Ctrl-C stops it.",
            flush=True,
        )
        stop.wait()
        print("stopping the model plane...", flush=True)
    finally:
        stop_local_serve()
    return 0
