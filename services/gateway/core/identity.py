"""Who is calling: an API key (Bearer) or an anonymous identity kept in an HMAC-signed cookie,
plus the client IP (X-Forwarded-For is believed only when the peer is a trusted proxy)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.gateway.backends.redis_store import Keyspace
from services.gateway.core.errors import Unauthenticated
from services.gateway.core.keys import KeyStore
from services.gateway.core.quotas import KeyCheck, Subject
from services.gateway.core.tiers import Tier
from services.gateway.settings import Settings

log = logging.getLogger(__name__)

ANON_COOKIE = "dsv2_anon"
_COOKIE_VERSION = "v1"


@dataclass(frozen=True)
class Identity:
    user_id: str
    tier: Tier
    anonymous: bool
    client_ip: str
    key_id: str | None = None
    # Set when the identity came from the gateway's key cache: not yet confirmed; quota
    # admission confirms it atomically (see ChatService._admit).
    key_check: KeyCheck | None = None

    def subjects(self, ip_tier: Tier) -> list[Subject]:
        """Quota subjects: the user, and for anonymous callers also their IP address."""
        subjects = [Subject("u:" + self.user_id, self.tier)]
        if self.anonymous:
            subjects.append(Subject("ip:" + self.client_ip, ip_tier))
        return subjects


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list) -> str:
    """The caller's address. X-Forwarded-For is read right to left, skipping trusted proxies,
    and only when the direct peer is itself a trusted proxy (anyone can send the header)."""
    peer = peer or "unknown"
    if not forwarded_for or not trusted or not _in(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _in(hop, trusted):
            return _normalize(hop)
    return peer


def _normalize(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr[:64]


def _in(addr: str, nets: list) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


class CookieSigner:
    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def _sig(self, anon_id: str) -> str:
        mac = hmac.new(self.secret, f"{_COOKIE_VERSION}.{anon_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def issue(self) -> tuple[str, str]:
        """A fresh anonymous id and its cookie value."""
        anon_id = secrets.token_urlsafe(16)
        return anon_id, f"{_COOKIE_VERSION}.{anon_id}.{self._sig(anon_id)}"

    def verify(self, value: str) -> str | None:
        """The anonymous id if the cookie is intact, else None (tampered or foreign)."""
        parts = value.split(".")
        if len(parts) != 3 or parts[0] != _COOKIE_VERSION or not 16 <= len(parts[1]) <= 64:
            return None
        if not hmac.compare_digest(parts[2], self._sig(parts[1])):
            return None
        return parts[1]


class IdentityResolver:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        keyspace: Keyspace,
        keys: KeyStore,
        tiers: dict[str, Tier],
    ) -> None:
        self.settings = settings
        self.r = redis
        self.ks = keyspace
        self.keys = keys
        self.tiers = tiers
        self._signer: CookieSigner | None = None
        if settings.cookie_secret.get_secret_value():
            self._signer = CookieSigner(settings.cookie_secret.get_secret_value().encode())

    def tier(self, name: str) -> Tier:
        tier = self.tiers.get(name)
        if tier is None:
            log.warning("unknown tier %r; using %r", name, self.settings.anonymous_tier)
            tier = self.tiers[self.settings.anonymous_tier]
        return tier

    @property
    def anonymous_tier(self) -> Tier:
        return self.tier(self.settings.anonymous_tier)

    @property
    def anonymous_ip_tier(self) -> Tier:
        return self.tier(self.settings.anonymous_ip_tier)

    async def signer(self) -> CookieSigner:
        """Without a configured secret, replicas agree on one stored in Redis (created once)."""
        if self._signer is None:
            key = self.ks.cookie_secret()
            await self.r.set(key, secrets.token_hex(32), nx=True)
            secret = await self.r.get(key)
            self._signer = CookieSigner(secret.encode())
        return self._signer

    async def from_api_key(self, authorization: str, ip: str, *, cached: bool = False) -> Identity:
        """The key's identity, looked up in Redis; with cached=True possibly from the key
        cache instead, unconfirmed (`key_check` set): only for callers that have quota
        admission confirm it and that retry with a fresh lookup when anything fails."""
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "Malformed Authorization header: expected 'Authorization: Bearer <api key>'."
            )
        check = None
        resolved = None
        if cached:
            d, resolved = self.keys.cached(token)
            if resolved is not None:
                check = KeyCheck(
                    key=self.ks.api_key(d),
                    user_key=self.ks.user(resolved.user_id),
                    user_id=resolved.user_id,
                    tier=resolved.tier,
                    key_id=resolved.key_id,
                )
        if resolved is None:
            resolved = await self.keys.resolve(token)
        if resolved is None:
            raise Unauthenticated("Invalid API key (unknown or revoked).")
        return Identity(
            user_id=resolved.user_id,
            tier=self.tier(resolved.tier),
            anonymous=False,
            client_ip=ip,
            key_id=resolved.key_id,
            key_check=check,
        )

    async def anonymous(self, cookie: str | None, ip: str) -> tuple[Identity, str | None]:
        """The anonymous identity, and a cookie value to set when a new one was issued (no
        cookie yet, or a tampered one, which is replaced)."""
        signer = await self.signer()
        anon_id = signer.verify(cookie) if cookie else None
        new_cookie = None
        if anon_id is None:
            anon_id, new_cookie = signer.issue()
        identity = Identity(
            user_id="anon:" + anon_id, tier=self.anonymous_tier, anonymous=True, client_ip=ip
        )
        return identity, new_cookie
