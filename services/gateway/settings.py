"""One Settings class for the gateway, read from the environment (prefix DSV2_) and CLI flags."""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gateway.core.validation import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSV2_", extra="ignore")

    # Listening addresses (HTTP and gRPC are served by the same process).
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051

    # Redis holds every piece of state: keys, quotas, sessions.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Chat sessions in a Redis of their own (empty: in redis_url's). Why: maxmemory and its
    # eviction policy are per server, not per logical database, and quota keys need TTLs, so
    # no policy on a shared server can evict sessions yet never quotas. The sessions server
    # runs `allkeys-lru` (least recently used sessions go first when full); the main one
    # keeps keys and quotas under `noeviction`. On one shared server run `noeviction`: session
    # writes past maxmemory are then refused with 503 `session_store_full`.
    sessions_redis_url: str = ""
    redis_key_prefix: str = "dsv2:"
    # redis-py's asyncio pool refuses past its cap; the blocking pool waits instead.
    redis_max_connections: int = 64
    redis_pool_timeout_s: float = 2.0
    redis_socket_timeout_s: float = 2.0
    # Quotas only: admit requests without accounting while Redis is down (sessions still 503).
    quota_fail_open: bool = False

    # Model plane: Ray Serve's gRPC ingress and the application name it routes on.
    model_target: str = "127.0.0.1:9000"
    model_app: str = "dsv2"
    model_timeout_s: float = 10.0
    model_info_ttl_s: float = 30.0

    # Tiers (YAML); `free` applies to anonymous users unless changed here.
    tiers_file: Path | None = None
    anonymous_tier: str = "free"
    # Per-IP limits for anonymous traffic, so clearing cookies does not reset a quota.
    anonymous_ip_tier: str = "free"
    # Comma-separated addresses/CIDRs whose X-Forwarded-For is trusted.
    trusted_proxies: str = ""

    # HMAC key of the anonymous cookie; when empty, one is created once and shared via Redis.
    cookie_secret: SecretStr = SecretStr("")
    cookie_secure: bool = False
    cookie_max_age_days: int = 365

    # POST /v1/chat/completions through the fast lane (fast_lane.py: same parsing, errors and
    # handler, without FastAPI's per-request dependency solving); off = FastAPI's routing.
    http_fast_lane: bool = True

    # How long the fast lane may reuse an API key's lookup. Safe at any value: the quota
    # admission confirms the key atomically and a stale one is looked up again (so a revoked
    # key or a changed tier takes effect at once); 0 = look every key up every time.
    api_key_cache_s: float = 60.0

    # Input limits (validation.Limits), the same on HTTP and gRPC; sizes in UTF-8 bytes.
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_message_bytes: int = 128_000
    max_request_bytes: int = 256_000
    max_stop: int = 4
    max_stop_bytes: int = 256
    max_system_prompt_bytes: int = 32_000
    max_title_chars: int = 200
    # Tokens the chat template may add per message and per prompt, for the token reservation
    # made before tokenizing (bytes of content + these).
    template_tokens_per_message: int = 32
    template_tokens_fixed: int = 32
    # Pictures (image_url content parts, gRPC Message.images): per image (encoded bytes; pixels,
    # read from the header before decoding), per message, per request. The HTTP body and gRPC
    # message limits grow by what these allow (Limits.body_bytes_for_images).
    max_image_bytes: int = Field(default=10 * 2**20, ge=1)
    max_image_pixels: int = Field(default=16_000_000, ge=1)
    max_images_per_message: int = Field(default=4, ge=0)
    max_images_per_request: int = Field(default=8, ge=0)
    max_image_request_bytes: int = Field(default=16 * 2**20, ge=0)
    # http(s) image URLs: refused unless their host is named here (comma-separated host
    # names, e.g. "images.example.com,cdn.example.org"); the gateway then fetches them itself,
    # after quota admission, within max_image_bytes and this timeout. Empty = data: URLs only
    # (no server-side fetching).
    image_url_hosts: str = ""
    image_fetch_timeout_s: float = Field(default=5.0, gt=0)

    # How long a request may wait for the model plane to start answering (first streamed
    # message) before it gets 503 + Retry-After instead of hanging on an overloaded plane.
    model_start_timeout_s: float = 30.0

    # A request refused again for a spent request window before its Retry-After is answered
    # (429) by this process after this pause, without Redis; 0 = at once. Clients that honour
    # Retry-After never see it; ones looping on refusals go idle.
    repeat_refusal_delay_s: float = 1.0

    # Concurrent-stream leases and turn locks expire unless renewed, so a dead replica's
    # slots come back after this long.
    stream_lease_s: float = 30.0

    # SIGTERM: how long running streams may go on before each gets a final "server is
    # restarting" error (the chart's terminationGracePeriodSeconds is this plus margins).
    drain_grace_s: float = 20.0

    # Admin API (/v1/admin/*): callers send `Authorization: Bearer <admin key>`. Empty = the
    # admin API is off (every admin route answers 404).
    admin_key: SecretStr = SecretStr("")

    # Budget alerts (core/budget_alerts.py): POSTed here (http or https) once per user and day
    # at 80% and 100% of a daily budget; empty = off. Delivery never delays a request.
    budget_webhook_url: str = ""
    budget_webhook_timeout_s: float = Field(default=5.0, gt=0)
    budget_webhook_attempts: int = Field(default=3, ge=1, le=10)

    @field_validator("budget_webhook_url")
    @classmethod
    def _webhook_is_http(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return v
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"DSV2_BUDGET_WEBHOOK_URL must be an http:// or https:// URL with a host, got {v!r}"
            )
        return v

    @cached_property
    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})

    @cached_property
    def image_url_host_set(self) -> frozenset[str]:
        return frozenset(
            h.strip().lower().rstrip(".") for h in self.image_url_hosts.split(",") if h.strip()
        )

    @property
    def body_limit_bytes(self) -> int:
        """The HTTP body / gRPC request limit: text (max_body_bytes) plus the images allowed."""
        return self.max_body_bytes + self.limits.body_bytes_for_images

    @cached_property
    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        nets = []
        for part in self.trusted_proxies.split(","):
            part = part.strip()
            if part:
                nets.append(ipaddress.ip_network(part, strict=False))
        return nets
