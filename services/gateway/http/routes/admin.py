"""Admin API for operators, behind the admin key (Settings.admin_key, `Authorization: Bearer
<admin key>`): usage per user per day, a user's tier, keys and quotas, changing a tier.

Without an admin key configured every route here answers 404 (the API does not exist); a
missing key is 401, a wrong one 403. The key is compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.core.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from services.gateway.core.quotas import Subject
from services.gateway.core.usage import UsageRecord, parse_day, read_usage, utc_day
from services.gateway.http.deps import GatewayDep
from services.gateway.http.routes.usage import usage_out
from services.gateway.http.schemas import UsageOut


async def require_admin(request: Request, gw: GatewayDep) -> None:
    configured = gw.settings.admin_key.get_secret_value()
    if not configured:
        raise NotFound(
            "The admin API is disabled on this gateway (set DSV2_ADMIN_KEY to enable it).",
            code="admin_api_disabled",
        )
    auth = request.headers.get("authorization") or ""
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "The admin API needs 'Authorization: Bearer <admin key>'.", code="admin_key_missing"
        )
    if not hmac.compare_digest(token.strip().encode(), configured.encode()):
        raise Forbidden("Wrong admin key.", code="invalid_admin_key")


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class UsageRecordOut(BaseModel):
    user_id: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    refusals: dict[str, int]  # reason (e.g. tokens_per_day) -> count


class UsageListOut(BaseModel):
    day: str
    data: list[UsageRecordOut]


class KeyOut(BaseModel):
    key_id: str
    tier: str
    name: str
    created_at: int
    hint: str


class UserOut(BaseModel):
    user_id: str
    tier: str | None  # the tier the user's requests get (None: no keys, no override)
    tier_override: str | None  # set by POST .../tier or `dsv2 users set-tier`
    keys: list[KeyOut]
    usage_today: UsageRecordOut
    quotas: UsageOut | None


class TierIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str = Field(min_length=1, max_length=100)


class TierOut(BaseModel):
    user_id: str
    tier: str


def _day(day: str | None) -> str:
    if day is None:
        return utc_day()
    try:
        return parse_day(day)
    except ValueError as e:
        raise InvalidInput(str(e), param="day", code="invalid_day") from e


def _record(r: UsageRecord) -> UsageRecordOut:
    return UsageRecordOut(**r.as_dict())


UserIdPath = Annotated[str, Path(min_length=1, max_length=200)]


@router.get("/usage", response_model=UsageListOut)
async def get_usage(
    gw: GatewayDep,
    user: Annotated[str | None, Query(max_length=200)] = None,
    day: Annotated[str | None, Query(description="YYYY-MM-DD (UTC); today by default")] = None,
) -> UsageListOut:
    """Usage of one day: every user who used the service, busiest first, or one user."""
    d = _day(day)
    records = await read_usage(gw.redis, gw.ks, d, user or None)
    return UsageListOut(day=d, data=[_record(r) for r in records])


def _effective_tier(override: str | None, keys: list[KeyOut]) -> str | None:
    """What the user's requests get: the override, else their newest key's tier."""
    if override:
        return override
    return keys[-1].tier if keys else None


@router.get("/users/{user_id}", response_model=UserOut)
async def get_user(gw: GatewayDep, user_id: UserIdPath) -> UserOut:
    override = await gw.keys.user_tier(user_id)
    keys = [
        KeyOut(key_id=k.key_id, tier=k.tier, name=k.name, created_at=k.created_at, hint=k.hint)
        for k in await gw.keys.list(user_id)
    ]
    tier_name = _effective_tier(override, keys)
    quotas = None
    if tier_name is not None:
        tier = gw.identity.tier(tier_name)
        quotas = usage_out(user_id, tier.name, await gw.quotas.usage(Subject("u:" + user_id, tier)))
    (today,) = await read_usage(gw.redis, gw.ks, utc_day(), user_id)
    return UserOut(
        user_id=user_id,
        tier=tier_name,
        tier_override=override,
        keys=keys,
        usage_today=_record(today),
        quotas=quotas,
    )


@router.post("/users/{user_id}/tier", response_model=TierOut)
async def set_tier(gw: GatewayDep, user_id: UserIdPath, body: TierIn) -> TierOut:
    """Set the user's tier (wins over the tier of their keys); takes effect at their next
    request on every replica."""
    if body.tier not in gw.tiers:
        raise InvalidInput(
            f"Unknown tier {body.tier!r}; configured tiers: {', '.join(sorted(gw.tiers))}.",
            param="tier",
            code="unknown_tier",
        )
    await gw.keys.set_user_tier(user_id, body.tier)
    return TierOut(user_id=user_id, tier=body.tier)
