"""Creating a session, for the HTTP and gRPC APIs alike: the creation counts against the
tier's `sessions_per_minute` / `sessions_per_day` (per user and, for anonymous callers, per
client IP too), then the store keeps the owner within `max_sessions` (sessions.py).

The creation limits reuse the quota windows of quota_admit.lua (sliding minute and day, exact
across replicas, all-or-nothing over the subjects), on counters of their own
(`q:<subject>:sessions:rpm|rpd`), so creating sessions does not use up chat requests.
"""

from __future__ import annotations

import logging

from services.gateway.core.errors import RateLimited
from services.gateway.core.identity import Identity
from services.gateway.core.quotas import Subject
from services.gateway.core.sessions import Session
from services.gateway.core.tiers import Tier
from services.gateway.state import Gateway

log = logging.getLogger(__name__)

_REASONS = {
    "requests_per_minute": ("sessions_per_minute", "minute"),
    "requests_per_day": ("sessions_per_day", "day"),
}


def _creation_subject(s: Subject) -> Subject | None:
    """The quota subject counting `s`'s session creations, or None when unlimited."""
    t = s.tier
    if not (t.sessions_per_minute or t.sessions_per_day):
        return None
    window_tier = Tier(
        name=t.name,
        requests_per_minute=t.sessions_per_minute,
        requests_per_day=t.sessions_per_day,
        tokens_per_day=0,
        concurrent_streams=0,
        max_tokens_per_request=1,
        session_ttl_days=t.session_ttl_days,
    )
    # Same "ip:"/"u:" start as the request quotas, so the refusal names who is limited.
    return Subject(s.key + ":sessions", window_tier)


async def admit_creation(gw: Gateway, identity: Identity) -> None:
    """Count one session creation, or raise RateLimited (429 `sessions_per_minute` /
    `sessions_per_day`, with Retry-After); nothing is counted when refused."""
    subjects = [
        c
        for s in identity.subjects(gw.identity.anonymous_ip_tier)
        if (c := _creation_subject(s)) is not None
    ]
    if not subjects:
        return
    try:
        await gw.quotas.admit(subjects, 0)  # no tokens, no stream slot: nothing to release
    except RateLimited as e:
        code, window = _REASONS.get(e.code or "", ("sessions_per_minute", "minute"))
        refusing = next(
            (s for s in subjects if ("this IP address" in e.message) == s.key.startswith("ip:")),
            subjects[0],
        )
        limit = getattr(refusing.tier, code.replace("sessions", "requests"))
        who = "this IP address" if refusing.key.startswith("ip:") else "your account"
        retry = e.headers.get("Retry-After", "60")
        gw.metrics.quota_rejections.labels(code).inc()
        raise RateLimited(
            f"Too many new sessions for {who} ({refusing.tier.name} tier): at most {limit} "
            f"per {window}. Retry after {retry} s, or keep using an existing session.",
            code=code,
            headers={"Retry-After": retry},
        ) from e


async def create_session(
    gw: Gateway, identity: Identity, title: str, system_prompt: str
) -> Session:
    await admit_creation(gw, identity)
    session, evicted = await gw.sessions.create(
        identity.user_id, identity.tier, title=title, system_prompt=system_prompt
    )
    if evicted:
        log.info(
            "user %s at %d sessions: deleted the %d least recently used",
            identity.user_id,
            identity.tier.max_sessions,
            evicted,
        )
    return session
