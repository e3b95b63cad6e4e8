"""`dsv2 usage [--user U] [--day YYYY-MM-DD] [--json]`: requests, tokens and refusals per user
per UTC day (recorded by the gateway; kept 35 days)."""

from __future__ import annotations

import argparse
import json
import sys

from services.gateway.cli.common import add_redis_arguments, run_with_key_store
from services.gateway.core.keys import KeyStore
from services.gateway.core.usage import UsageRecord, parse_day, read_usage, utc_day
from services.gateway.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_redis_arguments(parser)
    parser.add_argument("--user", help="only this user (default: every user of the day)")
    parser.add_argument("--day", help="UTC day, YYYY-MM-DD (default: today)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _refusals(r: UsageRecord) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(r.refusals.items())) or "-"


async def _run(args: argparse.Namespace, settings: Settings, store: KeyStore) -> int:
    try:
        day = parse_day(args.day) if args.day else utc_day()
    except ValueError as e:
        print(f"error: --day: {e}", file=sys.stderr)
        return 2
    records = await read_usage(store.r, store.ks, day, args.user)
    if args.json:
        print(json.dumps({"day": day, "data": [r.as_dict() for r in records]}, indent=2))
        return 0
    print("user\tday\trequests\tprompt_tokens\tcompletion_tokens\ttotal_tokens\trefusals")
    for r in records:
        print(
            f"{r.user_id}\t{r.day}\t{r.requests}\t{r.prompt_tokens}\t{r.completion_tokens}\t"
            f"{r.total_tokens}\t{_refusals(r)}"
        )
    if not records:
        print(f"# no usage recorded on {day}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_with_key_store(args, _run)
