"""Budget alerts: a JSON POST to the operator's webhook (Settings.budget_webhook_url) when a
user reaches 80% and 100% of a daily budget (tokens_per_day, requests_per_day, also a
model's own ones), once per user, day, budget and threshold across every gateway replica.

quotas.py reports what it learns anyway (the figures its Lua calls return), so watching costs
nothing on the request path. A crossing is claimed with SET NX in Redis (the one replica that
claims it sends it) and delivered in a background task, with a timeout and bounded retries: a
slow or dead webhook never delays or fails a request. A delivery that fails every attempt
gives its claim back, so a later request of that user can send it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import httpx
import redis.asyncio as aioredis

from services.gateway.backends.redis_store import REDIS_DOWN_ERRORS, Keyspace
from services.gateway.core.usage import utc_day

if TYPE_CHECKING:
    from services.gateway.core.quotas import QuotaState, Subject

log = logging.getLogger(__name__)

THRESHOLDS = (80, 100)  # percent of a daily budget
_CLAIM_TTL_S = 2 * 86400  # outlives the day it is for
_SEEN_MAX = 100_000


class BudgetAlerts:
    def __init__(
        self,
        redis: aioredis.Redis,
        keyspace: Keyspace,
        url: str,
        *,
        timeout_s: float = 5.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.r = redis
        self.ks = keyspace
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        # Crossings this process already claimed or saw claimed: most requests after a
        # crossing then cost not even the SET NX.
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None

    # --- what quotas.py reports (synchronous and cheap: called on the request path) ---------

    def admitted(self, user_id: str, subject: Subject, state: QuotaState) -> None:
        w = state.requests_per_day
        self._observe(user_id, subject, "requests_per_day", w.used, w.limit)

    def tokens_used(self, user_id: str, subject: Subject, used: int) -> None:
        self._observe(user_id, subject, "tokens_per_day", used, subject.tier.tokens_per_day)

    def refused(self, user_id: str, subject: Subject, reason: str, state: QuotaState) -> None:
        """A refusal for a daily budget means that budget is spent for this user: the 100%
        alert goes out even when the counter is short of the limit (a token reservation that
        does not fit what is left); `used` says what the counter holds."""
        if reason == "requests_per_day":
            w = state.requests_per_day
        elif reason == "tokens_per_day":
            w = state.tokens_per_day
        else:
            return
        self._observe(user_id, subject, reason, w.used, w.limit, spent=True)

    def _observe(
        self,
        user_id: str,
        subject: Subject,
        metric: str,
        used: int,
        limit: int,
        spent: bool = False,
    ) -> None:
        if limit <= 0:
            return
        for threshold in THRESHOLDS:
            if used * 100 < threshold * limit and not spent:
                break
            day = utc_day()
            name = f"{metric}:{subject.model}" if subject.model else metric
            claim = self.ks.budget_alert(day, user_id, name, threshold)
            if claim in self._seen:
                continue
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen.add(claim)
            payload = {
                "user": user_id,
                "tier": subject.tier.name,
                "model": subject.model or None,
                "metric": metric,
                "threshold": threshold,
                "used": used,
                "limit": limit,
                "day": day,
            }
            task = asyncio.get_running_loop().create_task(self._send(claim, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- delivery (background) ---------------------------------------------------------------

    async def _send(self, claim: str, payload: dict) -> None:
        try:
            if not await self.r.set(claim, "1", nx=True, ex=_CLAIM_TTL_S):
                return  # another replica (or this one, earlier) sends it
        except REDIS_DOWN_ERRORS as e:
            self._seen.discard(claim)
            log.warning("budget alert for %s not sent: Redis unavailable: %s", claim, e)
            return
        if await self._post(payload):
            return
        self._seen.discard(claim)
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await self.r.delete(claim)

    async def _post(self, payload: dict) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = await self._client.post(self.url, json=payload)
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"
            else:
                if r.is_success:
                    return True
                err = f"HTTP {r.status_code}"
            log.warning(
                "budget alert webhook attempt %d/%d failed: %s", attempt + 1, self.attempts, err
            )
        return False

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (at most timeout_s) for deliveries under way."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
