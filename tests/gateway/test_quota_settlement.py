"""Token settlement (reservations hash, refunds of expired leases, retry-safe finish) together
with per-model counters and usage accounting, against a real Redis: a model's expired lease
is refunded into that model's counter even when another model's call sweeps the shared stream
slots first, and a retried finish adds its tokens to the user's usage once."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.gateway.backends.redis_store import Keyspace, make_redis
from services.gateway.core.quotas import Lease, Quotas, Subject
from services.gateway.core.usage import read_usage, utc_day
from services.gateway.settings import Settings
from tests.gateway.conftest import tier

LEASE_MS = 1000
# Past the lease, with margin for a busy machine, and well before its zset's own TTL
# (2 × LEASE_MS), which forgets an expired lease unrefunded.
EXPIRED_S = LEASE_MS / 1000 + 0.4

VL_TIER = tier(
    "free",
    tokens_per_day=10_000,
    concurrent_streams=5,
    models={"dsv2-vl": {"tokens_per_day": 1_000}},
)


@pytest.fixture
async def redis(redis_url: str):
    r = make_redis(Settings(redis_url=redis_url))
    yield r
    await r.aclose()


@pytest.fixture
def quotas(redis: aioredis.Redis) -> Quotas:
    return Quotas(redis, Keyspace("dsv2:"), lease_ms=LEASE_MS)


async def _audit(redis: aioredis.Redis, subject: Subject) -> tuple[int, int, int]:
    """(admitted, refunded, counter) of the subject's (or its model's) day."""
    keys = Quotas(redis, Keyspace("dsv2:"))._keys(subject, int(time.time() // 86400))
    admitted, refunded = await redis.hmget(keys[4], "admitted", "refunded")
    counter = await redis.get(keys[2])
    return int(admitted or 0), int(refunded or 0), int(counter or 0)


async def test_expired_lease_is_refunded_into_its_models_counter(
    quotas: Quotas, redis: aioredis.Redis
):
    user = Subject("u:set1", VL_TIER)
    await quotas.admit([user], 200, model="dsv2-vl")  # never finished: its gateway died
    await quotas.admit([user], 300, model="dsv2")  # the tier's own counter; never finished
    vl = user.for_model("dsv2-vl")
    assert (await quotas.usage(vl)).tokens_per_day.used == 200
    assert (await quotas.usage(user)).tokens_per_day.used == 300
    await asyncio.sleep(EXPIRED_S)
    # The tier's call comes first and sweeps the shared stream slots (both leases are there);
    # the model's reservation must still come back, into the model's counter.
    assert (await quotas.usage(user)).tokens_per_day.used == 0
    assert (await quotas.usage(vl)).tokens_per_day.used == 0
    assert (await quotas.usage(vl)).concurrent_streams.used == 0
    assert await _audit(redis, user) == (300, 300, 0)
    assert await _audit(redis, vl) == (200, 200, 0)


async def test_model_lease_settles_and_renews_in_both_zsets(quotas: Quotas, redis: aioredis.Redis):
    user = Subject("u:set2", VL_TIER)
    lease = await quotas.admit([user], 100, model="dsv2-vl")
    for _ in range(3):  # renewed past its first expiry: still live, nothing refunded
        await asyncio.sleep(LEASE_MS / 2000)
        await quotas.renew(lease)
    vl = user.for_model("dsv2-vl")
    state = await quotas.usage(vl)
    assert (state.tokens_per_day.used, state.concurrent_streams.used) == (100, 1)
    await quotas.finish(lease, 30, 10)
    state = await quotas.usage(vl)
    assert (state.tokens_per_day.used, state.concurrent_streams.used) == (40, 0)
    assert await _audit(redis, vl) == (100, 60, 40)


@pytest.mark.parametrize("tokens_per_day", [10_000, 0], ids=["token-limit", "no-token-limit"])
async def test_retried_finish_counts_usage_once(
    quotas: Quotas, redis: aioredis.Redis, tokens_per_day: int
):
    user_id = f"set3-{tokens_per_day}"
    user = Subject(f"u:{user_id}", tier("free", tokens_per_day=tokens_per_day))
    lease = await quotas.admit([user], 100, usage_user=user_id)
    await quotas.finish(lease, 6, 4)
    lease.finished = False  # as if the reply to the first finish had been lost
    await quotas.finish(lease, 6, 4)
    (rec,) = await read_usage(redis, quotas.ks, utc_day(), user_id)
    assert (rec.requests, rec.prompt_tokens, rec.completion_tokens) == (1, 6, 4)
    assert (await quotas.usage(user)).tokens_per_day.used == (10 if tokens_per_day else 0)


async def test_stalled_request_counts_usage_once_after_its_refund(
    quotas: Quotas, redis: aioredis.Redis
):
    """A request that outlived its lease was refunded whole; its late finish charges what it
    used and adds it to the usage, once however often it is retried."""
    user = Subject("u:set4", VL_TIER)
    lease: Lease = await quotas.admit([user], 250, model="dsv2-vl", usage_user="set4")
    await asyncio.sleep(EXPIRED_S)
    vl = user.for_model("dsv2-vl")
    assert (await quotas.usage(vl)).tokens_per_day.used == 0  # refunded as dead
    for _ in range(2):
        lease.finished = False
        await quotas.finish(lease, 30, 10)
    assert (await quotas.usage(vl)).tokens_per_day.used == 40
    assert await _audit(redis, vl) == (250, 210, 40)
    (rec,) = await read_usage(redis, quotas.ks, utc_day(), "set4")
    assert (rec.requests, rec.prompt_tokens, rec.completion_tokens) == (1, 30, 10)
