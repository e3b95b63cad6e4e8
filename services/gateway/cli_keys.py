"""`dsv2 keys create|list|revoke`: API keys (the secret is printed once, only its hash kept)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from services.gateway.cli_common import add_redis_arguments, settings_from, tier_exists
from services.gateway.keys import KeyStore
from services.gateway.redis_store import REDIS_DOWN_ERRORS, Keyspace, make_redis
from services.gateway.tiers import TierConfigError


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


async def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    redis = make_redis(settings)
    store = KeyStore(redis, Keyspace(settings.redis_key_prefix))
    try:
        if args.action == "create":
            if not tier_exists(settings, args.tier):
                return 2
            key, rec = await store.create(args.user, args.tier, args.name)
            print(key)
            print(
                f"# {rec.key_id} user={rec.user_id} tier={rec.tier} (shown once)", file=sys.stderr
            )
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
    finally:
        await redis.aclose()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except TierConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except REDIS_DOWN_ERRORS as e:
        print(f"error: cannot reach Redis: {e}", file=sys.stderr)
        return 1
