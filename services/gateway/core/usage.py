"""Usage per user per UTC day, for operators: requests, prompt and completion tokens, and
refusals by reason.

Recorded by the quota Lua calls themselves (quota_admit.lua counts the request or its refusal,
quota_finish.lua adds the tokens), so it costs no round trip of its own. One hash per user and
day (`usage:<YYYY-MM-DD>:<user>`) plus the day's set of users, both expiring after
USAGE_TTL_S. Refusals answered from a gateway's memory of a standing refusal (quotas.py
RefusalMemo: a client retrying before its Retry-After) never reach Redis and are not counted.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from services.gateway.backends.redis_store import Keyspace

USAGE_TTL_S = 35 * 86400  # a month of history, and a few days to read the last one


def utc_day(t: float | None = None) -> str:
    """'YYYY-MM-DD' of unix time `t` (now by default), in UTC like the daily quotas."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if t is None else t))


def parse_day(value: str) -> str:
    """`value` if it is a real date written YYYY-MM-DD, else ValueError saying so."""
    try:
        return dt.date.fromisoformat(value).isoformat() if len(value) == 10 else _bad(value)
    except ValueError:
        return _bad(value)


def _bad(value: str) -> str:
    raise ValueError(f"day must be a date written YYYY-MM-DD, got {value!r}")


@dataclass
class UsageRecord:
    user_id: str
    day: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}

    @classmethod
    def from_hash(cls, user_id: str, day: str, h: dict[str, str]) -> UsageRecord:
        rec = cls(user_id=user_id, day=day)
        for name, value in h.items():
            if name.startswith("refused:"):
                rec.refusals[name.removeprefix("refused:")] = int(value)
            elif name in ("requests", "prompt_tokens", "completion_tokens"):
                setattr(rec, name, int(value))
        return rec


async def read_usage(
    redis: aioredis.Redis, ks: Keyspace, day: str, user_id: str | None = None
) -> list[UsageRecord]:
    """One user's usage of `day` (a record of zeros when nothing was recorded), or every
    user's who used the service that day, busiest (most tokens) first."""
    users = [user_id] if user_id is not None else sorted(await redis.smembers(ks.usage_users(day)))
    async with redis.pipeline(transaction=False) as pipe:
        for u in users:
            pipe.hgetall(ks.usage(day, u))
        hashes = await pipe.execute()
    records = [UsageRecord.from_hash(u, day, h or {}) for u, h in zip(users, hashes, strict=True)]
    if user_id is None:
        records.sort(key=lambda r: (-r.total_tokens, -r.requests, r.user_id))
    return records
