"""Per-model limits (tiers `models:`) against a real Redis: a model's own, tighter budget,
counted apart from the tier's (neither drains the other), enforced atomically by the same Lua
admission; stream slots shared across models; the tiers file's `models:` section."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.gateway.backends.redis_store import Keyspace, make_redis
from services.gateway.core.errors import RateLimited
from services.gateway.core.quotas import Quotas, Subject
from services.gateway.core.tiers import TierConfigError, load_tiers
from services.gateway.settings import Settings
from tests.gateway.conftest import ThreadedGateway, auth, tier

BODY = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

VL_TIER = tier(
    "free",
    requests_per_minute=100,
    tokens_per_day=10_000,
    concurrent_streams=2,
    models={"dsv2-vl": {"requests_per_minute": 3, "tokens_per_day": 1_000}},
)


@pytest.fixture
async def quotas(redis_url: str):
    redis = make_redis(Settings(redis_url=redis_url))
    yield Quotas(redis, Keyspace("dsv2:"))
    await redis.aclose()


async def test_model_budget_is_its_own(quotas: Quotas):
    user = Subject("u:alice", VL_TIER)
    for _ in range(3):
        lease = await quotas.admit([user], 10, model="dsv2-vl")
        await quotas.finish(lease, 10)
    with pytest.raises(RateLimited) as e:
        await quotas.admit([user], 10, model="dsv2-vl")
    assert e.value.code == "requests_per_minute"
    assert "3 requests per minute" in e.value.message and "model dsv2-vl" in e.value.message
    # The tier's own budget (any other model, or none named) is untouched by dsv2-vl's use...
    tier_state = await quotas.usage(user)
    assert tier_state.requests_per_minute.used == 0 and tier_state.tokens_per_day.used == 0
    for model in ("dsv2", ""):
        lease = await quotas.admit([user], 500, model=model)
        await quotas.finish(lease, 500)
    # ...and the tier's use does not drain dsv2-vl's counters.
    vl = await quotas.usage(user.for_model("dsv2-vl"))
    assert vl.requests_per_minute.used == 3 and vl.tokens_per_day.used == 30
    assert vl.tokens_per_day.limit == 1_000
    state = await quotas.usage(user)
    assert state.requests_per_minute.used == 2 and state.tokens_per_day.used == 1000


async def test_model_token_budget_is_exact_under_concurrency(quotas: Quotas):
    # No request or stream limits: only the model's tokens can refuse.
    user = Subject("u:bob", tier("free", models={"dsv2-vl": {"tokens_per_day": 1_000}}))

    async def one() -> bool:
        try:
            await quotas.admit([user], 100, model="dsv2-vl")
        except RateLimited:
            return False
        return True

    admitted = await asyncio.gather(*(one() for _ in range(25)))
    assert sum(admitted) == 10  # 10 × 100 = the model's 1000, never one more


async def test_stream_slots_are_shared_across_models(quotas: Quotas):
    one = tier("free", concurrent_streams=1, models={"dsv2-vl": {"requests_per_minute": 5}})
    user = Subject("u:carol", one)
    lease = await quotas.admit([user], 1, model="dsv2-vl")
    with pytest.raises(RateLimited) as e:
        await quotas.admit([user], 1, model="dsv2")
    assert e.value.code == "concurrent_streams"
    await quotas.finish(lease, 1)
    await quotas.finish(await quotas.admit([user], 1, model="dsv2"), 1)


async def test_model_limit_over_http(gateway: ThreadedGateway, client: httpx.AsyncClient):
    key = gateway.create_key("pm1", "per_model")  # dsv2-scripted: 2 requests per minute
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    assert r.headers["x-ratelimit-limit-tokens"] == "5000"
    r = await client.post("/v1/chat/completions", json=BODY, headers=auth(key))
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "requests_per_minute" and "model dsv2-scripted" in err["message"]


async def test_limits_of_a_model_not_asked_for_change_nothing(
    gateway: ThreadedGateway, client: httpx.AsyncClient
):
    key = gateway.create_key("pm2", "other_model")  # 3/minute; dsv2-vl alone 1/minute
    codes = [
        (await client.post("/v1/chat/completions", json=BODY, headers=auth(key))).status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 200, 429]


def test_tiers_file_models(tmp_path):
    path = tmp_path / "tiers.yaml"
    path.write_text(
        "free:\n  models:\n    dsv2-vl:\n      tokens_per_day: 20000\n"
        "      requests_per_minute: 3\n"
    )
    free = load_tiers(path)["free"]
    vl = free.for_model("dsv2-vl")
    assert (vl.tokens_per_day, vl.requests_per_minute) == (20_000, 3)
    assert vl.requests_per_day == free.requests_per_day  # not given: the tier's
    assert free.for_model("dsv2") is free
    assert {free: 1}[load_tiers(path)["free"]] == 1  # still usable as a key (hash by value)
    path.write_text("free:\n  models:\n    dsv2-vl:\n      tokens_per_day: -5\n")
    with pytest.raises(TierConfigError, match="free"):
        load_tiers(path)
    path.write_text("free:\n  models:\n    dsv2-vl:\n      tokens_a_day: 5\n")  # a typo
    with pytest.raises(TierConfigError, match="tokens_a_day"):
        load_tiers(path)
