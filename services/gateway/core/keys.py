"""API keys: stored only as SHA-256 digests, each with the user id and tier it grants.

A user's tier can be changed later (`dsv2 users set-tier`); that override wins over the tier a
key was created with.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.gateway.backends.redis_store import Keyspace, load_script

KEY_PREFIX = "dsv2-"


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    user_id: str
    tier: str
    name: str
    created_at: int
    hint: str  # first characters of the key, enough to recognise it in a list


@dataclass(frozen=True)
class ResolvedKey:
    key_id: str
    user_id: str
    tier: str


class KeyStore:
    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, *, cache_s: float = 0.0) -> None:
        self.r = redis
        self.ks = keyspace
        self._resolve = load_script(redis, "resolve_key")
        # digest -> (monotonic time fetched, key). Entries are only a guess: whoever uses one
        # must have it confirmed atomically where it matters (quota_admit.lua's key check).
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ResolvedKey]] = {}

    async def create(self, user_id: str, tier: str, name: str = "") -> tuple[str, KeyRecord]:
        """Returns the secret key (shown once, never stored) and its record."""
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        record = KeyRecord(
            key_id=key_id,
            user_id=user_id,
            tier=tier,
            name=name,
            created_at=int(time.time()),
            hint=api_key[: len(KEY_PREFIX) + 4],
        )
        d = digest(api_key)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.ks.api_key(d),
                mapping={"user_id": user_id, "tier": tier, "key_id": key_id},
            )
            pipe.hset(
                self.ks.key_meta(key_id),
                mapping={
                    "digest": d,
                    "user_id": user_id,
                    "tier": tier,
                    "name": name,
                    "created_at": record.created_at,
                    "hint": record.hint,
                },
            )
            pipe.zadd(self.ks.key_index(), {key_id: record.created_at})
            pipe.sadd(self.ks.user_keys(user_id), key_id)
            await pipe.execute()
        return api_key, record

    async def resolve(self, api_key: str) -> ResolvedKey | None:
        d = digest(api_key)
        rec = await self._resolve(keys=[self.ks.api_key(d)], args=[self.ks.p])
        if not rec:
            self._cache.pop(d, None)
            return None
        user_id, tier, key_id = rec
        resolved = ResolvedKey(key_id=key_id, user_id=user_id, tier=tier)
        if self.cache_s > 0:
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[d] = (time.monotonic(), resolved)
        return resolved

    def cached(self, api_key: str) -> tuple[str, ResolvedKey | None]:
        """The key's digest, and what it resolved to at most cache_s ago (None if unknown)."""
        d = digest(api_key)
        hit = self._cache.get(d)
        if hit is None or time.monotonic() - hit[0] > self.cache_s:
            return d, None
        return d, hit[1]

    async def list(self, user_id: str | None = None) -> list[KeyRecord]:
        if user_id is None:
            key_ids = await self.r.zrange(self.ks.key_index(), 0, -1)
        else:
            key_ids = sorted(await self.r.smembers(self.ks.user_keys(user_id)))
        out = []
        for key_id in key_ids:
            meta = await self.r.hgetall(self.ks.key_meta(key_id))
            if meta:
                out.append(
                    KeyRecord(
                        key_id=key_id,
                        user_id=meta["user_id"],
                        tier=meta["tier"],
                        name=meta.get("name", ""),
                        created_at=int(meta["created_at"]),
                        hint=meta.get("hint", ""),
                    )
                )
        out.sort(key=lambda k: k.created_at)
        return out

    async def revoke(self, key_id: str) -> bool:
        meta = await self.r.hgetall(self.ks.key_meta(key_id))
        if not meta:
            return False
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.ks.api_key(meta["digest"]))
            pipe.delete(self.ks.key_meta(key_id))
            pipe.zrem(self.ks.key_index(), key_id)
            pipe.srem(self.ks.user_keys(meta["user_id"]), key_id)
            await pipe.execute()
        return True

    async def set_user_tier(self, user_id: str, tier: str) -> None:
        await self.r.hset(self.ks.user(user_id), "tier", tier)

    async def user_tier(self, user_id: str) -> str | None:
        return await self.r.hget(self.ks.user(user_id), "tier")
