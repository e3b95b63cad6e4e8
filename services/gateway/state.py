"""The gateway's parts, built once per process and shared by the HTTP and gRPC servers."""

from __future__ import annotations

import asyncio
import time

from services.gateway.backends.model_plane import (
    BackendInvalidRequest,
    BackendUnavailable,
    CheckedBackend,
    ModelBackend,
    as_backend,
)
from services.gateway.backends.redis_store import Keyspace, make_redis
from services.gateway.core.budget_alerts import BudgetAlerts
from services.gateway.core.drain import DrainState
from services.gateway.core.errors import model_unavailable
from services.gateway.core.identity import IdentityResolver
from services.gateway.core.images import ImageResolver
from services.gateway.core.keys import KeyStore
from services.gateway.core.quotas import Quotas
from services.gateway.core.sessions import SessionStore
from services.gateway.core.tiers import Tier, load_tiers
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import Settings
from services.rpc.dsv2.v1 import inference_pb2 as pb


class Gateway:
    def __init__(
        self,
        settings: Settings,
        backend: ModelBackend,
        *,
        tiers: dict[str, Tier] | None = None,
    ) -> None:
        self.settings = settings
        self.tiers = tiers if tiers is not None else load_tiers(settings.tiers_file)
        for name in (settings.anonymous_tier, settings.anonymous_ip_tier):
            if name not in self.tiers:
                raise ValueError(f"tier {name!r} (anonymous) is not defined in the tiers")
        self.redis = make_redis(settings)
        # Sessions in their own Redis when configured (see Settings.sessions_redis_url).
        sessions_url = settings.sessions_redis_url
        self.session_redis = (
            make_redis(settings, sessions_url)
            if sessions_url and sessions_url != settings.redis_url
            else self.redis
        )
        self.ks = Keyspace(settings.redis_key_prefix)
        lease_ms = int(settings.stream_lease_s * 1000)
        self.keys = KeyStore(self.redis, self.ks, cache_s=settings.api_key_cache_s)
        self.alerts = (
            BudgetAlerts(
                self.redis,
                self.ks,
                settings.budget_webhook_url,
                timeout_s=settings.budget_webhook_timeout_s,
                attempts=settings.budget_webhook_attempts,
            )
            if settings.budget_webhook_url
            else None
        )
        self.quotas = Quotas(
            self.redis,
            self.ks,
            lease_ms=lease_ms,
            fail_open=settings.quota_fail_open,
            refusal_delay_s=settings.repeat_refusal_delay_s,
            alerts=self.alerts,
        )
        self.sessions = SessionStore(self.session_redis, self.ks, lock_ms=lease_ms)
        self.identity = IdentityResolver(settings, self.redis, self.ks, self.keys, self.tiers)
        self.backend: CheckedBackend = as_backend(backend)
        # Pictures: allow-listed URLs fetched and every picture decoded, after admission.
        self.images = ImageResolver(settings.limits, timeout_s=settings.image_fetch_timeout_s)
        self.metrics = GatewayMetrics()
        # Finalizers (refunds, storing replies) run as tasks of their own so a client going
        # away cannot cut them short; kept here so they are not garbage-collected mid-way.
        self.background: set[asyncio.Task] = set()
        # SIGTERM: refuse new work, let running turns finish, then stop them (drain.py).
        self.drain_state = DrainState()
        self._model_info: pb.ModelInfoResponse | None = None
        self._model_info_at = 0.0
        self._model_info_lock = asyncio.Lock()

    def track(self, task: asyncio.Task) -> asyncio.Task:
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def model_info(self) -> pb.ModelInfoResponse:
        """Cached for a short while: the model plane's context size and name rarely change."""
        fresh = time.monotonic() - self._model_info_at < self.settings.model_info_ttl_s
        if self._model_info is not None and fresh:
            return self._model_info
        async with self._model_info_lock:
            if self._model_info is None or not (
                time.monotonic() - self._model_info_at < self.settings.model_info_ttl_s
            ):
                try:
                    info = await self.backend.model_info(pb.ModelInfoRequest())
                except (BackendUnavailable, BackendInvalidRequest) as e:
                    if self._model_info is not None:
                        return self._model_info  # stale is fine for a name and a size
                    raise model_unavailable(str(e)) from e
                self._model_info, self._model_info_at = info, time.monotonic()
        return self._model_info

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self.background:
            await asyncio.wait(list(self.background), timeout=timeout_s)

    async def close(self) -> None:
        await self.drain()
        if self.alerts is not None:
            await self.alerts.drain()
            await self.alerts.aclose()
        await self.backend.close()
        await self.images.aclose()
        if self.session_redis is not self.redis:
            await self.session_redis.aclose()
        await self.redis.aclose()
