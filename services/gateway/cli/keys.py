"""`dsv2 keys create|list|revoke`: API keys (the secret is printed once, only its hash kept)."""

from __future__ import annotations

import argparse
import sys
import time

from services.gateway.cli.common import add_redis_arguments, run_with_key_store, tier_exists
from services.gateway.core.keys import KeyStore
from services.gateway.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_redis_arguments(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a key for a user; prints it once")
    create.add_argument("--user", required=True, help="user id the key acts as")
    create.add_argument("--tier", default="free", help="tier granted by the key (default: free)")
    create.add_argument("--name", default="", help="label shown by `keys list`")
    lst = sub.add_parser("list", help="list keys (ids, users, tiers; never the secrets)")
    lst.add_argument("--user", help="only this user's keys")
    revoke = sub.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")


async def _run(args: argparse.Namespace, settings: Settings, store: KeyStore) -> int:
    if args.action == "create":
        if not tier_exists(settings, args.tier):
            return 2
        key, rec = await store.create(args.user, args.tier, args.name)
        print(key)
        print(f"# {rec.key_id} user={rec.user_id} tier={rec.tier} (shown once)", file=sys.stderr)
    elif args.action == "list":
        for k in await store.list(args.user):
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created_at))
            print(f"{k.key_id}\t{k.user_id}\t{k.tier}\t{k.hint}…\t{created}\t{k.name}")
    elif args.action == "revoke":
        if not await store.revoke(args.key_id):
            print(f"error: no key {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_with_key_store(args, _run)
