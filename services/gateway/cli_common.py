"""Flags shared by the gateway's commands, and turning them into Settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.gateway.settings import Settings
from services.gateway.tiers import load_tiers


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
