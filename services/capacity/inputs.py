"""What `dsv2 capacity` plans from: traffic assumptions, measured per-replica figures and the
deployment's shape, read from a YAML file and/or flags (a flag wins over the file).

Every input is one `Field`: its YAML key is the field name (`daily_users`), its flag the same
in kebab case (`--daily-users`). Checking happens here, once, so a bad value is reported with
the flag that sets it, and the planner can trust what it gets.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class InputError(ValueError):
    """An input the planner cannot use; the message names the flag and says what to give."""


# Checks: each takes the parsed value and returns an error phrase, or None when fine.
Check = Callable[[Any], str | None]


def positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def at_least_one(v: float) -> str | None:
    return None if v >= 1 else "must be at least 1"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def open_fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be greater than 0 and at most 1"


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # float, int, str, or dict (tier mix)
    help: str
    default: Any = None  # None: required (a measured figure, or traffic the plan needs)
    check: Check | None = None
    group: str = "traffic"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


TRAFFIC, MEASURED, DEPLOYMENT = "traffic", "measured", "deployment"

FIELDS: tuple[Field, ...] = (
    # Traffic assumptions.
    Field("daily_users", float, "users active on a day", None, positive),
    Field("turns_per_user", float, "chat turns one user sends a day", None, positive),
    Field(
        "prompt_tokens",
        float,
        "input tokens the model reads per turn (system prompt + history + new message)",
        None,
        positive,
    ),
    Field("reply_tokens", float, "tokens generated per turn", None, positive),
    Field(
        "cache_hit_rate",
        float,
        "fraction of input tokens served from the prefix cache (not recomputed)",
        None,
        fraction,
    ),
    Field(
        "tier_mix",
        dict,
        "share of turns per tier, e.g. free=0.9,pro=0.09,internal=0.01 (sums to 1)",
        None,
    ),
    Field("peak_factor", float, "peak traffic over the day's average", None, at_least_one),
    Field("requests_per_turn", float, "gateway requests per turn", 1.0, at_least_one),
    # Measured per-replica figures: no defaults, they depend on the hardware and the model.
    Field(
        "decode_tokens_per_s",
        float,
        "output tokens/s one Engine replica sustains (measured, at its full batch)",
        None,
        positive,
        MEASURED,
    ),
    Field(
        "prefill_tokens_per_s",
        float,
        "prompt tokens/s one Engine replica computes, counting cache misses only (measured)",
        None,
        positive,
        MEASURED,
    ),
    Field(
        "stream_tokens_per_s",
        float,
        "output tokens/s one stream sees at that load (measured); sets how long a turn streams",
        None,
        positive,
        MEASURED,
    ),
    Field(
        "gateway_requests_per_s",
        float,
        "streaming requests/s one gateway replica serves (measured)",
        None,
        positive,
        MEASURED,
    ),
    Field(
        "redis_calls_per_turn",
        float,
        "Redis round trips per turn (Lua script calls + plain commands; see docs/capacity.md)",
        None,
        positive,
        MEASURED,
    ),
    Field(
        "redis_commands_per_turn",
        float,
        "Redis commands executed per turn, counting those inside Lua scripts",
        None,
        positive,
        MEASURED,
    ),
    # The deployment's shape.
    Field(
        "model",
        str,
        "deepseek-v2, deepseek-v2-lite, or a config.json / checkpoint folder",
        "deepseek-v2",
        None,
        DEPLOYMENT,
    ),
    Field("weight_dtype", str, "dtype of the weights", "bfloat16", None, DEPLOYMENT),
    Field("cache_dtype", str, "dtype of the latent KV cache", "bfloat16", None, DEPLOYMENT),
    Field("gpu_memory_gib", float, "memory of one GPU", 80.0, positive, DEPLOYMENT),
    Field(
        "memory_utilization",
        float,
        "fraction of GPU memory weights + KV cache may use",
        0.9,
        open_fraction,
        DEPLOYMENT,
    ),
    Field(
        "target_utilization",
        float,
        "fraction of each measured throughput to plan for (headroom)",
        0.8,
        open_fraction,
        DEPLOYMENT,
    ),
    Field("gpus_per_engine", int, "GPUs per Engine replica", 1, at_least_one, DEPLOYMENT),
    Field("gpus_per_expert_shard", int, "GPUs per expert shard", 1, at_least_one, DEPLOYMENT),
    Field(
        "expert_shards",
        str,
        "expert shards per set: 'auto' (fewest that fit, 0 when the Engine holds every expert) or N",
        "auto",
        None,
        DEPLOYMENT,
    ),
    Field(
        "engines_per_expert_set",
        int,
        "Engine replicas one set of expert shards keeps up with (measured; 1 is safe)",
        1,
        at_least_one,
        DEPLOYMENT,
    ),
    Field(
        "min_gateway_replicas",
        int,
        "fewest gateway replicas (2 survives one failing)",
        2,
        at_least_one,
        DEPLOYMENT,
    ),
)

FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class Assumptions:
    """Checked inputs of one plan; see FIELDS for what each means."""

    daily_users: float
    turns_per_user: float
    prompt_tokens: float
    reply_tokens: float
    cache_hit_rate: float
    tier_mix: dict[str, float]
    peak_factor: float
    requests_per_turn: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    stream_tokens_per_s: float
    gateway_requests_per_s: float
    redis_calls_per_turn: float
    redis_commands_per_turn: float
    model: str
    weight_dtype: str
    cache_dtype: str
    gpu_memory_gib: float
    memory_utilization: float
    target_utilization: float
    gpus_per_engine: int
    gpus_per_expert_shard: int
    expert_shards: int | None  # None: choose the fewest that fit
    engines_per_expert_set: int
    min_gateway_replicas: int


assert [f.name for f in fields(Assumptions)] == [f.name for f in FIELDS]


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; values stay strings here and are parsed in `load_assumptions`, so a
    bad value is reported the same way whether it came from a flag or the YAML file."""
    titles = {
        TRAFFIC: "traffic assumptions",
        MEASURED: "measured per-replica figures (required)",
        DEPLOYMENT: "deployment",
    }
    groups = {g: parser.add_argument_group(t) for g, t in titles.items()}
    for f in FIELDS:
        default = "" if f.default is None else f" (default: {f.default})"
        groups[f.group].add_argument(
            f.flag, dest=f.name, default=None, metavar="VALUE", help=f.help + default
        )


def parse_tier_mix(raw: Any, flag: str) -> dict[str, float]:
    """`free=0.9,pro=0.1` (flag) or a mapping (YAML) -> {tier: share}, checked to sum to 1."""
    if isinstance(raw, str):
        mix: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, share = part.partition("=")
            if not sep or not name.strip():
                raise InputError(f"{flag}: {part!r} is not TIER=SHARE (e.g. free=0.9,pro=0.1)")
            mix[name.strip()] = share.strip()
    elif isinstance(raw, Mapping):
        mix = {str(k): v for k, v in raw.items()}
    else:
        raise InputError(f"{flag}: give TIER=SHARE pairs, e.g. free=0.9,pro=0.1")
    if not mix:
        raise InputError(f"{flag}: name at least one tier, e.g. free=1")
    shares = {name: _number(share, float, f"{flag} {name}") for name, share in mix.items()}
    for name, share in shares.items():
        if not 0 <= share <= 1:
            raise InputError(f"{flag}: the share of {name!r} is {share}; it must be in [0, 1]")
    total = math.fsum(shares.values())
    if abs(total - 1) > 1e-9:
        raise InputError(f"{flag}: the shares sum to {total:g}; they must sum to 1")
    return shares


def _number(raw: Any, kind: type, flag: str) -> float:
    if isinstance(raw, bool):
        raise InputError(f"{flag}: {raw!r} is not a number")
    try:
        value = kind(raw) if kind is float else _integer(raw)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise InputError(f"{flag}: {raw!r} is not {what}") from None
    if not math.isfinite(value):
        raise InputError(f"{flag}: {raw!r} is not a finite number")
    return value


def _integer(raw: Any) -> int:
    as_float = float(raw)
    if not as_float.is_integer():
        raise ValueError(raw)
    return int(as_float)


def _parse(f: Field, raw: Any) -> Any:
    if f.name == "tier_mix":
        return parse_tier_mix(raw, f.flag)
    if f.name == "expert_shards":
        if str(raw).strip().lower() == "auto":
            return None
        shards = _number(raw, int, f.flag)
        if shards < 0:
            raise InputError(f"{f.flag}: must be 'auto' or 0 or more (0: experts in the Engine)")
        return shards
    if f.kind is str:
        return str(raw)
    value = _number(raw, f.kind, f.flag)
    if f.check is not None and (problem := f.check(value)) is not None:
        raise InputError(f"{f.flag}: {problem} (got {raw!r})")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML file's mapping, its keys checked against the known fields."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"--config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config: {path} must hold a mapping of settings")
    unknown = sorted(str(k) for k in data if k not in FIELDS_BY_NAME)
    if unknown:
        raise InputError(
            f"--config: unknown setting(s) {', '.join(unknown)} in {path}; "
            f"known: {', '.join(FIELDS_BY_NAME)}"
        )
    return data


def load_assumptions(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> Assumptions:
    """Merge the file's values with the flags given (flags win), apply defaults, check all.
    A missing required figure is an error naming its flag."""
    values: dict[str, Any] = {}
    missing: list[str] = []
    for f in FIELDS:
        raw = flag_values.get(f.name)
        if raw is None:
            raw = file_values.get(f.name)
        if raw is None:
            if f.default is None:
                missing.append(f.flag)
                continue
            raw = f.default
        values[f.name] = _parse(f, raw)
    if missing:
        raise InputError(
            f"missing {', '.join(missing)}: give each as a flag or in the --config YAML file "
            "(measured figures come from benchmarks on your hardware; see docs/capacity.md)"
        )
    return Assumptions(**values)
