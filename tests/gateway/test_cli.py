"""`dsv2 keys create|list|revoke` and `dsv2 users set-tier` against a real Redis, and the tiers
file: what an operator runs."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.cli import main
from services.gateway.core.tiers import TierConfigError, load_tiers
from tests.gateway.conftest import ThreadedGateway, auth


def test_keys_lifecycle_and_set_tier(gateway: ThreadedGateway, redis_url, capsys, monkeypatch):
    monkeypatch.setenv("DSV2_REDIS_URL", redis_url)
    assert main(["keys", "create", "--user", "carol", "--tier", "pro", "--name", "laptop"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("dsv2-")
    # Only the hash is stored: the secret appears nowhere in Redis.
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    dump = [(k, r.type(k)) for k in r.keys("*")]
    assert all(key not in k for k, _ in dump)
    assert all(key not in str(r.hgetall(k)) for k, t in dump if t == "hash")

    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "carol\tpro" in listing and "laptop" in listing and key not in listing
    key_id = listing.split("\t")[0]

    usage = httpx.get(gateway.http_url + "/v1/usage", headers=auth(key)).json()
    assert (usage["user_id"], usage["tier"]) == ("carol", "pro")
    assert main(["users", "set-tier", "carol", "internal"]) == 0
    usage = httpx.get(gateway.http_url + "/v1/usage", headers=auth(key)).json()
    assert usage["tier"] == "internal"
    assert main(["users", "set-tier", "carol", "platinum"]) == 2
    assert "unknown tier" in capsys.readouterr().err

    assert main(["keys", "revoke", key_id]) == 0
    r = httpx.get(gateway.http_url + "/v1/usage", headers=auth(key))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert main(["keys", "revoke", key_id]) == 1


def test_tiers_file(tmp_path):
    path = tmp_path / "tiers.yaml"
    path.write_text(
        "tiers:\n  free:\n    requests_per_minute: 5\n    requests_per_day: 100\n"
        "    tokens_per_day: 1000\n    concurrent_streams: 1\n    max_tokens_per_request: 128\n"
        "    session_ttl_days: 2\n"
    )
    tiers = load_tiers(path)
    assert tiers["free"].requests_per_minute == 5 and tiers["free"].session_ttl_s == 2 * 86400
    assert "pro" in tiers and "internal" in tiers  # defaults kept
    path.write_text("pro:\n  requests_per_minute: 7\n")  # a default tier, one limit changed
    pro = load_tiers(path)["pro"]
    assert pro.requests_per_minute == 7 and pro.tokens_per_day == 2_000_000
    path.write_text("gold:\n  requests_per_minute: 7\n")  # a new tier must say everything
    with pytest.raises(TierConfigError, match="gold"):
        load_tiers(path)
    path.write_text("free:\n  requests_per_minute: -1\n")
    with pytest.raises(TierConfigError, match="free"):
        load_tiers(path)
    with pytest.raises(TierConfigError, match="cannot read"):
        load_tiers(tmp_path / "missing.yaml")


def test_authorization_header_errors_are_clear(gateway: ThreadedGateway):
    async def go() -> None:
        async with httpx.AsyncClient(base_url=gateway.http_url) as c:
            r = await c.get("/v1/usage", headers={"Authorization": "Basic abc"})
            assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]

    asyncio.run(go())
