"""Quota tiers: defaults, and loading them from a YAML file.

A limit of 0 means "unlimited" (no counter is kept for it).

Storage per identity (sessions.py enforces these atomically in Lua):
- max_sessions: sessions one user keeps; creating one more deletes the least recently
  updated first (the oldest sessions expire first, creation is never refused for this);
- max_messages_per_session / max_session_bytes: a turn that would go past either is refused
  with 409 `session_full` (start a new session); bytes count the title, the system prompt and
  every stored message (UTF-8). A reply is stored whole, so a session can end at most one reply
  (max_tokens_per_request tokens) over max_session_bytes;
- max_session_image_bytes: the pictures one session keeps (encoded bytes, each distinct
  picture counted once); a turn whose pictures would go past it is refused with 409
  `session_full`;
- sessions_per_minute / sessions_per_day: session creations, per user and, for anonymous
  callers, also per client IP (429 `sessions_per_minute` / `sessions_per_day`).

images_per_day counts the pictures requests carry (every picture of a conversation sent whole,
the new message's pictures in a session turn: the stored ones were counted when sent), per user
and for anonymous callers also per IP, atomically with the other quotas (429 `images_per_day`).
Their tokens count toward tokens_per_day like any prompt token.

Per-model budgets (`models:`): a model named there (by the id requests name, e.g. a
picture-capable one) gets its own request and token limits in that tier, counted in counters
of its own, so its traffic never drains the tier's budget for other models nor the reverse.
Concurrent streams stay one count per identity across models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The model plane's scheduling classes, highest last (inference.proto's Priority): a tier's
# requests are admitted ahead of lower classes, and under overload the model plane refuses the
# classes it sheds (by default free) with 503 + Retry-After.
PriorityName = Literal["free", "pro", "internal"]


class ModelLimits(BaseModel):
    """A tier's limits for one model; a limit left out is the tier's own value (0 = unlimited)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=0)
    requests_per_day: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    images_per_day: int | None = Field(default=None, ge=0)


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    requests_per_minute: int = Field(ge=0)
    requests_per_day: int = Field(ge=0)
    tokens_per_day: int = Field(ge=0)
    concurrent_streams: int = Field(ge=0)
    max_tokens_per_request: int = Field(ge=1)
    session_ttl_days: float = Field(gt=0)
    # Pictures per UTC day (see the module docstring); 0 = unlimited.
    images_per_day: int = Field(default=0, ge=0)
    # Storage per identity (see the module docstring). Defaults are bounded on purpose, so a
    # tier defined without them cannot fill Redis; 0 = unlimited.
    max_sessions: int = Field(default=100, ge=0)
    max_messages_per_session: int = Field(default=1_000, ge=0)
    max_session_bytes: int = Field(default=1_000_000, ge=0)
    max_session_image_bytes: int = Field(default=16 * 2**20, ge=0)
    sessions_per_minute: int = Field(default=10, ge=0)
    sessions_per_day: int = Field(default=500, ge=0)
    # Scheduling class in the model plane; a new tier without one gets the lowest.
    priority: PriorityName = "free"
    # Per-model budgets: model id -> limits (see the module docstring).
    models: dict[str, ModelLimits] = Field(default_factory=dict)

    def __hash__(self) -> int:
        # Frozen, so usable as a key, but `models` is a dict: hash its items by value.
        return hash(
            tuple(
                tuple(sorted(v.items())) if isinstance(v, dict) else v
                for v in self.__dict__.values()
            )
        )

    def for_model(self, model: str) -> Tier:
        """This tier with `model`'s own limits, or itself when the model has none."""
        limits = self.models.get(model)
        if limits is None:
            return self
        changes = {k: v for k, v in limits.model_dump().items() if v is not None}
        return self.model_copy(update=changes)

    @property
    def session_ttl_s(self) -> int:
        return max(1, int(self.session_ttl_days * 86400))


DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier(
        name="free",
        images_per_day=50,
        max_session_image_bytes=8 * 2**20,
        requests_per_minute=10,
        requests_per_day=200,
        tokens_per_day=100_000,
        concurrent_streams=2,
        max_tokens_per_request=1024,
        session_ttl_days=7,
        max_sessions=20,
        max_messages_per_session=200,
        max_session_bytes=256_000,
        sessions_per_minute=5,
        sessions_per_day=50,
        priority="free",
    ),
    "pro": Tier(
        name="pro",
        images_per_day=1_000,
        max_session_image_bytes=64 * 2**20,
        requests_per_minute=60,
        requests_per_day=5_000,
        tokens_per_day=2_000_000,
        concurrent_streams=8,
        max_tokens_per_request=4096,
        session_ttl_days=90,
        max_sessions=500,
        max_messages_per_session=2_000,
        max_session_bytes=4_000_000,
        sessions_per_minute=30,
        sessions_per_day=2_000,
        priority="pro",
    ),
    "internal": Tier(
        name="internal",
        images_per_day=0,
        max_session_image_bytes=256 * 2**20,
        requests_per_minute=6_000,
        requests_per_day=0,
        tokens_per_day=0,
        concurrent_streams=256,
        max_tokens_per_request=8192,
        session_ttl_days=30,
        max_sessions=10_000,
        max_messages_per_session=10_000,
        max_session_bytes=16_000_000,
        sessions_per_minute=0,
        sessions_per_day=0,
        priority="internal",
    ),
}


class TierConfigError(ValueError):
    """The tiers file is missing, unreadable or invalid; the message says where."""


def _describe(e: ValidationError) -> str:
    """One line per wrong setting: its name, what is wrong, the value given."""
    parts = []
    for err in e.errors(include_url=False):
        where = ".".join(str(x) for x in err["loc"]) or "tier"
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        parts.append(f"{where}: {err['msg']}{got}")
    return "; ".join(parts)


def load_tiers(path: Path | None) -> dict[str, Tier]:
    """Tiers from `path` (a mapping name -> limits, optionally under a top-level `tiers:` key),
    or the defaults. A tier named like a default may give only the limits it changes; a new
    tier must give the six request limits (the storage limits have bounded defaults).
    Defaults not named in the file are kept."""
    if path is None:
        return dict(DEFAULT_TIERS)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise TierConfigError(f"cannot read tiers file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise TierConfigError(f"tiers file {path} is not valid YAML: {e}") from e
    if isinstance(raw, dict) and isinstance(raw.get("tiers"), dict):
        raw = raw["tiers"]
    if not isinstance(raw, dict):
        raise TierConfigError(f"tiers file {path}: expected a mapping of tier name -> limits")
    tiers = dict(DEFAULT_TIERS)
    for name, limits in raw.items():
        if not isinstance(limits, dict):
            raise TierConfigError(f"tiers file {path}: tier {name!r} must be a mapping")
        base = DEFAULT_TIERS[name].model_dump() if name in DEFAULT_TIERS else {}
        try:
            tiers[str(name)] = Tier(**{**base, **limits, "name": str(name)})
        except ValidationError as e:
            raise TierConfigError(f"tiers file {path}: tier {name!r}: {_describe(e)}") from e
        except TypeError as e:
            raise TierConfigError(f"tiers file {path}: tier {name!r}: {e}") from e
    return tiers
