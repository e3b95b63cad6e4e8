"""Usage per user per day (recorded by the quota Lua calls, real Redis), `dsv2 usage`, and the
admin API behind DSV2_ADMIN_KEY: off by default (404), 401 without the key, 403 with a wrong
one."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import SecretStr

from services.cli import main
from services.gateway.core.usage import USAGE_TTL_S, utc_day
from tests.gateway.conftest import ThreadedGateway, auth

BODY = {"model": "dsv2-scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PROMPT = 3 + 1 + 2  # scripted tokenizer: one message of one word
ADMIN = "admin-secret-for-tests"


@pytest.fixture
def admin(gateway: ThreadedGateway, monkeypatch) -> dict[str, str]:
    """The shared gateway with the admin API on (restored after the test)."""
    monkeypatch.setattr(gateway.gateway.settings, "admin_key", SecretStr(ADMIN))
    return auth(ADMIN)


async def _traffic(client: httpx.AsyncClient, key: str) -> None:
    """2 answered requests of 6 + 4 tokens, then a refusal (per_model: 2 requests/minute on
    dsv2-scripted)."""
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=BODY, headers=auth(key))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = await client.post("/v1/chat/completions", json=BODY, headers=auth(key))
    assert r.status_code == 429


def test_usage_is_recorded_and_shown_by_the_cli(
    gateway: ThreadedGateway, redis_url, capsys, monkeypatch
):
    # Synchronous: the CLI runs its own event loop.
    key = gateway.create_key("dora", "per_model")
    with httpx.Client(base_url=gateway.http_url, timeout=30) as client:
        gateway.call(_traffic_on(gateway, key))
        r = client.post(  # answered by a 400 before admission: no usage
            "/v1/chat/completions", json={**BODY, "temperature": 9}, headers=auth(key)
        )
    assert r.status_code == 400
    gateway.drain()  # the finish (tokens) runs after the reply is sent

    monkeypatch.setenv("DSV2_REDIS_URL", redis_url)
    assert main(["usage", "--user", "dora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["day"] == utc_day()
    assert out["data"] == [
        {
            "user_id": "dora",
            "day": utc_day(),
            "requests": 2,
            "prompt_tokens": 2 * PROMPT,
            "completion_tokens": 8,
            "total_tokens": 2 * PROMPT + 8,
            "refusals": {"requests_per_minute": 1},
        }
    ]
    assert main(["usage"]) == 0  # every user of the day, as a table
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("user\tday\trequests")
    assert f"dora\t{utc_day()}\t2\t12\t8\t20\trequests_per_minute=1" in table
    assert main(["usage", "--day", "2026-02-30"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    assert main(["usage", "--day", "2020-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == []

    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    ttl = r.ttl(gateway.gateway.ks.usage(utc_day(), "dora"))
    r.close()
    assert USAGE_TTL_S - 60 < ttl <= USAGE_TTL_S  # bounded: the key goes by itself


async def _traffic_on(gateway: ThreadedGateway, key: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as client:
        await _traffic(client, key)


async def test_admin_api_is_off_without_a_key(gateway: ThreadedGateway, client: httpx.AsyncClient):
    for method, path in [
        ("GET", "/v1/admin/usage"),
        ("GET", "/v1/admin/users/dora"),
        ("POST", "/v1/admin/users/dora/tier"),
    ]:
        r = await client.request(method, path, headers=auth("anything"), json={"tier": "pro"})
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "admin_api_disabled"
        assert "DSV2_ADMIN_KEY" in r.json()["error"]["message"]


async def test_admin_key_is_required(
    gateway: ThreadedGateway, client: httpx.AsyncClient, admin: dict
):
    r = await client.get("/v1/admin/usage")
    assert r.status_code == 401 and r.json()["error"]["code"] == "admin_key_missing"
    r = await client.get("/v1/admin/usage", headers=auth(ADMIN + "x"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_admin_key"
    user_key = gateway.create_key("eve", "free")  # a user's API key is not an admin key
    r = await client.get("/v1/admin/usage", headers=auth(user_key))
    assert r.status_code == 403
    assert (await client.get("/v1/admin/usage", headers=admin)).status_code == 200


async def test_admin_usage_user_and_tier(
    gateway: ThreadedGateway, client: httpx.AsyncClient, admin: dict
):
    key, _ = gateway.call(gateway.gateway.keys.create("fred", "per_model", "laptop"))
    await _traffic(client, key)
    gateway.drain()
    r = await client.get("/v1/admin/usage", headers=admin)
    assert r.status_code == 200
    data = r.json()
    assert data["day"] == utc_day()
    (fred,) = [u for u in data["data"] if u["user_id"] == "fred"]
    assert (fred["requests"], fred["total_tokens"]) == (2, 2 * PROMPT + 8)
    assert fred["refusals"] == {"requests_per_minute": 1}
    r = await client.get("/v1/admin/usage", params={"user": "nobody"}, headers=admin)
    assert r.json()["data"][0]["requests"] == 0
    r = await client.get("/v1/admin/usage", params={"day": "yesterday"}, headers=admin)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_day"

    user = (await client.get("/v1/admin/users/fred", headers=admin)).json()
    assert (user["tier"], user["tier_override"]) == ("per_model", None)
    assert [k["name"] for k in user["keys"]] == ["laptop"]
    assert user["usage_today"]["requests"] == 2
    assert user["quotas"]["tier"] == "per_model"

    r = await client.post("/v1/admin/users/fred/tier", json={"tier": "gold"}, headers=admin)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_tier"
    assert "pro" in r.json()["error"]["message"]
    r = await client.post("/v1/admin/users/fred/tier", json={"tierr": "pro"}, headers=admin)
    assert r.status_code == 400
    r = await client.post("/v1/admin/users/fred/tier", json={"tier": "roomy"}, headers=admin)
    assert r.status_code == 200 and r.json() == {"user_id": "fred", "tier": "roomy"}
    # At once, on the user's next request: roomy has no per-model limit, so fred is served.
    r = await client.post("/v1/chat/completions", json=BODY, headers=auth(key))
    assert r.status_code == 200
    user = (await client.get("/v1/admin/users/fred", headers=admin)).json()
    assert (user["tier"], user["tier_override"]) == ("roomy", "roomy")
