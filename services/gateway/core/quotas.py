"""Exact quotas shared by every gateway replica: one Lua call per check (quota_admit.lua).

- requests per minute / per day: sliding windows (sorted sets of admission times);
- tokens per day (UTC day): prompt + max_tokens reserved at admission, the unused part
  refunded when the request ends, whatever the way it ends; a request whose gateway died
  before ending it is refunded whole once its lease expires (nothing was delivered whole);
- concurrent streams: leases that expire unless renewed, so a dead replica's slots come back;
- pictures per day (UTC day): the pictures a request carries, counted at admission like the
  request itself (never refunded: decoding them was work done).

A model with its own limits in the tier (tiers.py `models:`) is counted in counters of its own
(`q:<subject>:m:<model>:*`); the stream slots stay shared. The same Lua calls also record the
user's usage of the day (usage.py) and return what budget alerts need (budget_alerts.py), so
neither costs a round trip of its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS, Keyspace, load_script
from services.gateway.core.budget_alerts import BudgetAlerts
from services.gateway.core.errors import RateLimited, redis_unavailable
from services.gateway.core.tiers import Tier
from services.gateway.core.usage import USAGE_TTL_S, utc_day

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
# KEYS per subject of quota_finish.lua: tokens counter, stream zset, reservations hash, counted
# lease zset.
_FINISH_KEYS = 4
MINUTE_MS = 60_000
# Figures per subject in quota_admit.lua's answer.
_FIGURES = 8


@dataclass(frozen=True)
class Subject:
    """Who a quota is counted against: a user ("u:<id>") or, for anonymous traffic, an IP."""

    key: str
    tier: Tier
    # Set when the tier has limits of its own for the model asked for: `tier` then holds them
    # and the request and token counters are the model's.
    model: str = ""

    @property
    def counted_key(self) -> str:
        """Whose request and token counters (and remembered refusals) these are."""
        return f"{self.key}:m:{self.model}" if self.model else self.key

    def for_model(self, model: str) -> Subject:
        if not model or model not in self.tier.models:
            return self
        return Subject(self.key, self.tier.for_model(model), model)


class IdentityChanged(Exception):
    """Admission refused because the API key an identity was taken from (from the gateway's
    key cache) was revoked or now grants another user or tier; nothing was taken."""


@dataclass(frozen=True)
class KeyCheck:
    """What a cached API-key identity assumed; quota_admit.lua checks it atomically."""

    key: str  # apikey:<sha256>
    user_key: str  # user:<id> (tier override)
    user_id: str
    tier: str
    key_id: str


@dataclass
class Window:
    limit: int  # 0 = unlimited
    used: int
    reset_ms: int  # unix ms when the window next frees capacity

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used) if self.limit else 0


@dataclass
class QuotaState:
    requests_per_minute: Window
    requests_per_day: Window
    tokens_per_day: Window
    concurrent_streams: Window
    now_ms: int
    images_per_day: Window = field(default_factory=lambda: Window(0, 0, 0))

    def tighter(self, other: QuotaState) -> QuotaState:
        """Window by window, the one with less left (an unlimited one never wins): what the
        caller can really still use when several subjects (anonymous cookie and IP) apply."""

        def pick(a: Window, b: Window) -> Window:
            if not b.limit:
                return a
            if not a.limit or b.remaining < a.remaining:
                return b
            return a

        return QuotaState(
            requests_per_minute=pick(self.requests_per_minute, other.requests_per_minute),
            requests_per_day=pick(self.requests_per_day, other.requests_per_day),
            tokens_per_day=pick(self.tokens_per_day, other.tokens_per_day),
            concurrent_streams=pick(self.concurrent_streams, other.concurrent_streams),
            now_ms=self.now_ms,
            images_per_day=pick(self.images_per_day, other.images_per_day),
        )

    def request_window(self, reason: str = "") -> Window:
        """The request window to show in x-ratelimit-*-requests: the refusing one, else the
        tighter of minute/day."""
        if reason == "requests_per_day":
            return self.requests_per_day
        m, d = self.requests_per_minute, self.requests_per_day
        if not m.limit:
            return d
        if d.limit and d.remaining < m.remaining:
            return d
        return m

    def headers(self, reason: str = "") -> dict[str, str]:
        h: dict[str, str] = {}
        req = self.request_window(reason)
        if req.limit:
            h["x-ratelimit-limit-requests"] = str(req.limit)
            h["x-ratelimit-remaining-requests"] = str(req.remaining)
            h["x-ratelimit-reset-requests"] = _duration(req.reset_ms - self.now_ms)
        tok = self.tokens_per_day
        if tok.limit:
            h["x-ratelimit-limit-tokens"] = str(tok.limit)
            h["x-ratelimit-remaining-tokens"] = str(tok.remaining)
            h["x-ratelimit-reset-tokens"] = _duration(tok.reset_ms - self.now_ms)
        return h


def _duration(ms: int) -> str:
    """OpenAI-style duration: '850ms', '12s', '6m0s', '3h2m5s'."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    s = math.ceil(ms / 1000)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


@dataclass
class Lease:
    """An admitted request: what to release and refund when it ends."""

    lease_id: str
    reserved: int
    finish_keys: list[str] = field(default_factory=list)
    stream_keys: list[str] = field(default_factory=list)
    state: QuotaState | None = None
    accounted: bool = True  # False when admitted fail-open without Redis
    finished: bool = False
    subjects: list[Subject] = field(default_factory=list)
    usage_key: str = ""  # the user's usage hash of the day ("" = not recorded)
    user_id: str = ""


# A remembered refusal is re-checked in Redis at least this often, so a limit raised by an
# operator (a tier change) takes effect within it.
MEMO_MAX_S = 60.0
_MEMO_REASONS = ("requests_per_minute", "requests_per_day")


class RefusalMemo:
    """Subjects refused for a request window: such a refusal stands until its Retry-After
    (request windows free capacity only as time passes; nothing refunds them), so this process
    answers the subject's next requests itself until then, without Redis (and, for anonymous
    IPs, without reading the body: see middleware.py). That keeps a client looping on refused
    requests cheap. Bounded in size; entries expire by themselves."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, tuple[float, RateLimited]] = {}

    def note(self, subject_key: str, err: RateLimited, retry_s: float) -> None:
        if len(self._until) >= self.max_entries:
            self._expire()
            if len(self._until) >= self.max_entries:
                return
        self._until[subject_key] = (time.monotonic() + min(retry_s, MEMO_MAX_S), err)

    def refusal(self, subject_keys: list[str]) -> RateLimited | None:
        """The standing refusal of any of these subjects (Retry-After brought up to date)."""
        now = time.monotonic()
        for key in subject_keys:
            hit = self._until.get(key)
            if hit is None:
                continue
            until, err = hit
            if until <= now:
                del self._until[key]
                continue
            retry_s = max(1, math.ceil(until - now))
            headers = {**err.headers, "Retry-After": str(retry_s)}
            return RateLimited(err.message, code=err.code, headers=headers)
        return None

    def clear(self) -> None:
        self._until.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (until, _) in self._until.items() if until <= now]:
            del self._until[key]


class Quotas:
    def __init__(
        self,
        redis: aioredis.Redis,
        keyspace: Keyspace,
        *,
        lease_ms: int = 30_000,
        fail_open: bool = False,
        refusal_delay_s: float = 0.0,
        alerts: BudgetAlerts | None = None,
    ) -> None:
        self.r = redis
        self.ks = keyspace
        self.lease_ms = lease_ms
        self.fail_open = fail_open
        self._admit = load_script(redis, "quota_admit")
        self._finish = load_script(redis, "quota_finish")
        self._renew = load_script(redis, "quota_renew")
        self.memo = RefusalMemo()
        self.refusal_delay_s = refusal_delay_s
        self.alerts = alerts

    def _keys(self, subject: Subject, day: int) -> list[str]:
        counted = subject.counted_key
        return [
            self.ks.quota(counted, "rpm"),
            self.ks.quota(counted, "rpd"),
            self.ks.quota(counted, f"tok:{day}"),
            self.ks.quota(subject.key, "streams"),  # one count across models
            self.ks.quota(counted, f"res:{day}"),  # settles `tok`, so the model's own
            # The leases whose reservations `res` holds (the streams key itself for a subject
            # without a model of its own): how an unsettled one is found when it expires.
            self.ks.quota(counted, "streams"),
            self.ks.quota(counted, f"img:{day}"),  # pictures of the day
        ]

    async def _call(
        self,
        subjects: list[Subject],
        lease_id: str,
        reserve: int,
        mode: str,
        check: KeyCheck | None = None,
        usage_user: str = "",
        images: int = 0,
    ) -> tuple[list, int]:
        now = time.time()
        day = int(now // 86400)
        day_end_ms = (day + 1) * DAY_MS
        keys: list[str] = []
        args: list = [lease_id, reserve, self.lease_ms, day_end_ms - int(now * 1000), mode]
        args += [len(subjects), 1 if check is not None else 0, usage_user, USAGE_TTL_S, images]
        for s in subjects:
            keys += self._keys(s, day)
            args += [
                s.tier.requests_per_minute,
                s.tier.requests_per_day,
                s.tier.tokens_per_day,
                s.tier.concurrent_streams,
                s.tier.images_per_day,
            ]
        if check is not None:
            keys += [check.key, check.user_key]
            args += [check.user_id, check.tier, check.key_id]
        if usage_user:
            d = utc_day(now)
            keys += [self.ks.usage(d, usage_user), self.ks.usage_users(d)]
        res = await self._admit(keys=keys, args=args)
        return res, day_end_ms

    @staticmethod
    def _state(res: list, index: int, tier: Tier, day_end_ms: int) -> QuotaState:
        now = int(res[3])
        f = [int(x) for x in res[4 + _FIGURES * index : 4 + _FIGURES * index + _FIGURES]]
        rpm_count, rpm_oldest, rpd_count, rpd_oldest, tok_used, streams, lease_exp, images = f
        return QuotaState(
            requests_per_minute=Window(
                tier.requests_per_minute,
                rpm_count,
                rpm_oldest + MINUTE_MS if rpm_count else now,
            ),
            requests_per_day=Window(
                tier.requests_per_day, rpd_count, rpd_oldest + DAY_MS if rpd_count else now
            ),
            tokens_per_day=Window(tier.tokens_per_day, tok_used, day_end_ms),
            concurrent_streams=Window(
                tier.concurrent_streams, streams, lease_exp if streams else now
            ),
            now_ms=now,
            images_per_day=Window(tier.images_per_day, images, day_end_ms),
        )

    async def admit(
        self,
        subjects: list[Subject],
        reserve: int,
        *,
        check: KeyCheck | None = None,
        model: str = "",
        usage_user: str = "",
        images: int = 0,
    ) -> Lease:
        """Take one request (and `reserve` tokens, and a stream slot) from every subject, or
        none at all. Raises RateLimited (429) naming the limit, with Retry-After and
        x-ratelimit-* headers; IdentityChanged when `check` no longer holds.

        model: the model asked for (its own limits apply where the tier has some);
        usage_user: the user whose usage of the day counts this request (or its refusal), and
        whose budget alerts it may trigger; "" for admissions that are not chat requests;
        images: the pictures the request carries (images_per_day)."""
        subjects = [s.for_model(model) for s in subjects]
        if check is None:  # (an unconfirmed cached key must still reach the key check)
            standing = self.memo.refusal([s.counted_key for s in subjects])
            if standing is not None:
                await self.slow_down()
                raise standing
        lease_id = secrets.token_hex(8)
        try:
            res, day_end_ms = await self._call(
                subjects, lease_id, reserve, "admit", check, usage_user, images
            )
        except REDIS_DOWN_ERRORS as e:
            # Fail-open skips the quotas, not the key check: an identity that still needs
            # confirming (check) gets the 503 an uncached key lookup would have had.
            if self.fail_open and check is None:
                log.warning("quota check skipped (fail-open): Redis unavailable: %s", e)
                return Lease(lease_id=lease_id, reserved=reserve, accounted=False)
            raise redis_unavailable() from e
        admitted, refusing, reason = int(res[0]), int(res[1]), str(res[2])
        if reason == "identity_changed":
            raise IdentityChanged(check.key_id if check else "")
        if not admitted:
            subject = subjects[refusing - 1]
            state = self._state(res, refusing - 1, subject.tier, day_end_ms)
            err = self._refusal(subject, state, reason, reserve, images)
            if usage_user and refusing == 1 and self.alerts is not None:
                self.alerts.refused(usage_user, subject, reason, state)
            if reason in _MEMO_REASONS:
                self.memo.note(subject.counted_key, err, err.retry_after_s)  # type: ignore[attr-defined]
            raise err
        day = int((day_end_ms - 1) // DAY_MS)
        lease = Lease(lease_id=lease_id, reserved=reserve, subjects=subjects, user_id=usage_user)
        if usage_user:
            lease.usage_key = self.ks.usage(utc_day(day * 86400), usage_user)
        for s in subjects:
            k = self._keys(s, day)
            lease.finish_keys += [k[2], k[3], k[4], k[5]]
            lease.stream_keys += [k[3]] if k[5] == k[3] else [k[3], k[5]]
        states = [self._state(res, i, s.tier, day_end_ms) for i, s in enumerate(subjects)]
        lease.state = functools.reduce(QuotaState.tighter, states)
        if usage_user and self.alerts is not None:
            self.alerts.admitted(usage_user, subjects[0], states[0])
        return lease

    async def slow_down(self) -> None:
        """Before repeating a standing refusal: a client asking again before its Retry-After
        ignores it, and looping on instant refusals costs CPU on both ends; the pause makes
        such a loop idle (a coroutine asleep costs next to nothing)."""
        if self.refusal_delay_s > 0:
            await asyncio.sleep(self.refusal_delay_s)

    def _refusal(
        self, subject: Subject, state: QuotaState, reason: str, reserve: int, images: int = 0
    ):
        now = state.now_ms
        if reason == "requests_per_minute":
            retry_ms = state.requests_per_minute.reset_ms - now
            what = f"{subject.tier.requests_per_minute} requests per minute"
        elif reason == "requests_per_day":
            retry_ms = state.requests_per_day.reset_ms - now
            what = f"{subject.tier.requests_per_day} requests per day"
        elif reason == "tokens_per_day":
            retry_ms = state.tokens_per_day.reset_ms - now
            what = (
                f"{subject.tier.tokens_per_day} tokens per day "
                f"({state.tokens_per_day.remaining} left, this request needs {reserve}: "
                "prompt + max_tokens; lower max_tokens or wait)"
            )
        elif reason == "images_per_day":
            retry_ms = state.images_per_day.reset_ms - now
            what = (
                f"{subject.tier.images_per_day} images per day "
                f"({state.images_per_day.remaining} left, this request carries {images}; "
                "send fewer pictures or wait)"
            )
        else:
            retry_ms = 1000
            what = f"{subject.tier.concurrent_streams} concurrent streams"
        who = "this IP address" if subject.key.startswith("ip:") else "your account"
        if subject.model:
            who += f" on model {subject.model}"
        retry_s = max(1, math.ceil(retry_ms / 1000))
        headers = state.headers(reason)
        headers["Retry-After"] = str(retry_s)
        err = RateLimited(
            f"Rate limit reached for {who} ({subject.tier.name} tier): {what}. "
            f"Retry after {retry_s} s.",
            code=reason,
            headers=headers,
        )
        err.state = state  # type: ignore[attr-defined]
        err.retry_after_s = retry_s  # type: ignore[attr-defined]
        return err

    async def finish(self, lease: Lease, prompt_tokens: int, completion_tokens: int = 0) -> None:
        """Release the stream slot, refund reserved-but-unused tokens and add the used ones to
        the user's usage of the day. Idempotent."""
        if lease.finished or not lease.accounted:
            lease.finished = True
            return
        prompt_tokens, completion_tokens = max(0, prompt_tokens), max(0, completion_tokens)
        refund = max(0, lease.reserved - prompt_tokens - completion_tokens)
        keys = list(lease.finish_keys)
        if lease.usage_key:
            keys.append(lease.usage_key)
        n = len(lease.finish_keys) // _FINISH_KEYS
        alerts = self.alerts if lease.user_id and lease.subjects else None
        args = [lease.lease_id, refund, n, prompt_tokens, completion_tokens]
        args.append(1 if alerts is not None and lease.subjects[0].tier.tokens_per_day else 0)
        # Safe to retry (quota_finish.lua settles once), e.g. after a reply lost to a
        # reconnect: the counters, the audit totals and the usage stay exact.
        counters = await self._finish(keys=keys, args=args)
        lease.finished = True
        if alerts is not None and counters:
            alerts.tokens_used(lease.user_id, lease.subjects[0], int(counters[0]))

    async def renew(self, lease: Lease) -> None:
        if lease.accounted and lease.stream_keys and not lease.finished:
            await self._renew(keys=lease.stream_keys, args=[lease.lease_id, self.lease_ms])

    async def usage(self, subject: Subject) -> QuotaState:
        try:
            res, day_end_ms = await self._call([subject], "peek", 0, "peek")
        except REDIS_DOWN_ERRORS as e:
            raise redis_unavailable() from e
        return self._state(res, 0, subject.tier, day_end_ms)
