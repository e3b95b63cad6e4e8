"""`dsv2 gateway`: serve HTTP + gRPC in one process.

The model plane is Ray Serve's gRPC ingress (--model-target, --model-app), or with
`--model DIR` an engine inside this process (embedded mode; imports the engine lazily).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from services.engine_args import (
    add_engine_arguments,
    add_shedding_arguments,
    engine_options_from,
)
from services.gateway.cli.common import add_redis_arguments, settings_from
from services.gateway.core.tiers import TierConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_redis_arguments(parser)
    parser.add_argument(
        "--sessions-redis-url",
        help="a separate Redis for chat sessions (default: $DSV2_SESSIONS_REDIS_URL, or the "
        "same Redis)",
    )
    parser.add_argument("--host", dest="http_host", help="HTTP bind address")
    parser.add_argument("--port", dest="http_port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-host", help="gRPC bind address")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    parser.add_argument("--model-target", help="model plane gRPC address (default 127.0.0.1:9000)")
    parser.add_argument("--model-app", help="Ray Serve application name (default dsv2)")
    parser.add_argument(
        "--model", type=Path, help="embedded mode: run the engine on this checkpoint in-process"
    )
    add_engine_arguments(parser)  # embedded mode only
    add_shedding_arguments(parser)
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop when installed; it cuts per-request CPU)",
    )


def embedded_backend(
    model_dir: Path, model_id: str | None = None, engine_options: dict[str, Any] | None = None
):
    """An InferenceService over an in-process engine built from ``engine_options``
    (EngineOptions fields: device, dtype, sizing), serving `model_id` (default: the
    checkpoint folder's name). Imported lazily: only this mode needs torch and the engine."""
    from services.engine import AsyncEngine, InferenceService

    async_engine = AsyncEngine.from_pretrained(model_dir, **(engine_options or {}))
    served_id = model_id or Path(model_dir).resolve().name
    return InferenceService(async_engine, async_engine.tokenizer, served_id)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from(
            args,
            http_host=args.http_host,
            http_port=args.http_port,
            grpc_host=args.grpc_host,
            grpc_port=args.grpc_port,
            model_target=args.model_target,
            model_app=args.model_app,
            sessions_redis_url=args.sessions_redis_url,
        )
        from services.gateway.server import GatewayServer

        engine_options = engine_options_from(args)
        if args.model is not None:
            backend = embedded_backend(args.model, engine_options=engine_options)
        elif engine_options:
            given = ", ".join("--" + k.replace("_", "-") for k in engine_options)
            raise ValueError(f"{given}: engine flags need --model (embedded mode)")
        else:
            from services.gateway.backends.model_plane import GrpcModelBackend

            backend = GrpcModelBackend(
                settings.model_target, settings.model_app, timeout_s=settings.model_timeout_s
            )
        server = GatewayServer(settings, backend, log_level=args.log_level.lower())
    except (TierConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            runner.run(server.serve())
    except KeyboardInterrupt:
        pass
    return 0


def loop_factory(choice: str = "auto"):
    """uvloop's loop when asked for (or installed, with auto); None = asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("error: --loop uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop
