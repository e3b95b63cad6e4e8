"""Flags shared by the gateway's commands, turning them into Settings, and running a command
against the key store."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS, Keyspace, make_redis
from services.gateway.core.keys import KeyStore
from services.gateway.core.tiers import TierConfigError, load_tiers
from services.gateway.settings import Settings

KeyStoreAction = Callable[[argparse.Namespace, Settings, KeyStore], Awaitable[int]]


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (default: $DSV2_REDIS_URL)")
    parser.add_argument(
        "--tiers", type=Path, help="tiers YAML file (default: $DSV2_TIERS_FILE or built-in)"
    )


def settings_from(args: argparse.Namespace, **fields) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides = {k: v for k, v in fields.items() if v is not None}
    if getattr(args, "redis_url", None):
        overrides["redis_url"] = args.redis_url
    if getattr(args, "tiers", None):
        overrides["tiers_file"] = args.tiers
    return Settings(**overrides)


def tier_exists(settings: Settings, tier: str) -> bool:
    """True if `tier` is configured; otherwise says which tiers are, on stderr."""
    tiers = load_tiers(settings.tiers_file)
    if tier in tiers:
        return True
    print(f"error: unknown tier {tier!r}; known: {', '.join(sorted(tiers))}", file=sys.stderr)
    return False


def run_with_key_store(args: argparse.Namespace, action: KeyStoreAction) -> int:
    """Run `action` on the key store of the configured Redis and return its exit status;
    2 for a tiers file that does not load, 1 when Redis cannot be reached."""

    async def main() -> int:
        settings = settings_from(args)
        redis = make_redis(settings)
        try:
            return await action(
                args, settings, KeyStore(redis, Keyspace(settings.redis_key_prefix))
            )
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except TierConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except REDIS_DOWN_ERRORS as e:
        print(f"error: cannot reach Redis: {e}", file=sys.stderr)
        return 1
