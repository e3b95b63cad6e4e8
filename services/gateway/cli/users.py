"""`dsv2 users set-tier USER TIER`: change a user's tier (wins over the tier of their keys)."""

from __future__ import annotations

import argparse

from services.gateway.cli.common import add_redis_arguments, run_with_key_store, tier_exists
from services.gateway.core.keys import KeyStore
from services.gateway.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_redis_arguments(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    st = sub.add_parser("set-tier", help="set a user's tier")
    st.add_argument("user")
    st.add_argument("tier")
    show = sub.add_parser("show", help="print a user's tier override")
    show.add_argument("user")


async def _run(args: argparse.Namespace, settings: Settings, store: KeyStore) -> int:
    if args.action == "set-tier":
        if not tier_exists(settings, args.tier):
            return 2
        await store.set_user_tier(args.user, args.tier)
        print(f"{args.user}: tier {args.tier}")
    else:
        print(f"{args.user}: tier {await store.user_tier(args.user) or '(from key)'}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_with_key_store(args, _run)
