"""GET /v1/usage: the caller's quotas and what is left of them."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.core.quotas import QuotaState, Subject, Window
from services.gateway.http.deps import GatewayDep, IdentityDep
from services.gateway.http.schemas import QuotaOut, UsageOut

router = APIRouter(tags=["usage"])


def _quota(w: Window) -> QuotaOut:
    if not w.limit:
        return QuotaOut(limit=None, remaining=None, reset_at=w.reset_ms // 1000)
    return QuotaOut(limit=w.limit, remaining=w.remaining, reset_at=-(-w.reset_ms // 1000))


def usage_out(user_id: str, tier: str, s: QuotaState) -> UsageOut:
    return UsageOut(
        user_id=user_id,
        tier=tier,
        requests_per_minute=_quota(s.requests_per_minute),
        requests_per_day=_quota(s.requests_per_day),
        tokens_per_day=_quota(s.tokens_per_day),
        concurrent_streams=_quota(s.concurrent_streams),
        images_per_day=_quota(s.images_per_day),
    )


@router.get("/v1/usage", response_model=UsageOut)
async def get_usage(gw: GatewayDep, identity: IdentityDep) -> UsageOut:
    state = await gw.quotas.usage(Subject("u:" + identity.user_id, identity.tier))
    return usage_out(identity.user_id, identity.tier.name, state)
