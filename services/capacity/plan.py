"""The capacity arithmetic: checked assumptions in, replica and GPU counts out.

Throughput: at peak, the Engine replicas must generate every reply token and compute every
prompt token the prefix cache does not hold. One replica time-shares the two (continuous
batching with chunked prefill), so its load is decode share + prefill share:

    load = output tok/s / decode tok/s per replica + uncached prompt tok/s / prefill tok/s

and replicas = ceil(load / target utilization). Disaggregated serving (DeepSeek's prefill and
decode nodes) needs the same sum of nodes on average, which is what the published check in
tests/capacity compares.

Memory: an Engine replica holds the non-expert weights (every weight when experts run in the
Engine) and the latent KV cache of the streams it serves at once (Little's law: streams =
turns/s × seconds a reply streams). When that cache does not fit beside the weights, more
replicas are planned so that it does.

Everything model-derived (parameter counts, KV bytes per token) comes from model.accounting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.accounting import dtype_bytes, kv_cache_bytes_per_token, param_counts
from model.config import ConfigError, DeepseekV2Config
from services.capacity.inputs import Assumptions, InputError

SECONDS_PER_DAY = 86_400
GIB = 1 << 30
MODELS_DIR = Path(__file__).parent / "models"


def load_model_config(model: str) -> DeepseekV2Config:
    """A shipped published config by name, else a config.json / checkpoint folder path."""
    shipped = MODELS_DIR / f"{model}.json"
    path = shipped if shipped.is_file() else Path(model)
    known = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.json")))
    try:
        return DeepseekV2Config.from_pretrained(path)
    except FileNotFoundError:
        raise InputError(
            f"--model: {model!r} is neither a known model ({known}) nor a config.json "
            "or checkpoint folder"
        ) from None
    except (ConfigError, ValueError, TypeError) as e:
        raise InputError(f"--model: {model!r} is not a usable DeepSeek-V2 config: {e}") from None


@dataclass(frozen=True)
class TierLoad:
    tier: str
    share: float
    peak_turns_per_s: float
    engine_load: float  # Engine replicas this tier's traffic keeps busy at peak (fractional)


@dataclass(frozen=True)
class Plan:
    # Traffic.
    turns_per_day: float
    average_turns_per_s: float
    peak_turns_per_s: float
    peak_requests_per_s: float
    input_tokens_per_day: float
    output_tokens_per_day: float
    peak_input_tokens_per_s: float
    peak_uncached_input_tokens_per_s: float
    peak_output_tokens_per_s: float
    # Engine replicas.
    engine_load: float  # replicas kept fully busy at peak (before headroom)
    average_engine_load: float  # the same over the day's average traffic
    engine_replicas_for_throughput: int
    concurrent_streams: float  # at peak, over all replicas
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_stream: float
    engine_weight_bytes: float
    engine_memory_bytes: float  # what weights + cache may use per replica
    engine_replicas_for_memory: int
    engine_replicas: int
    kv_cache_gib_per_replica: float  # the cache its share of streams needs, at the plan
    # Experts.
    expert_shards_per_set: int  # 0: experts run inside the Engine
    expert_sets: int
    expert_shard_replicas: int
    expert_shard_weight_bytes: float
    group_limited: bool  # n_group is a multiple of the shard count (a token meets <= topk_group)
    # Totals.
    engine_gpus: int
    expert_gpus: int
    gpus: int
    gateway_replicas: int
    peak_redis_calls_per_s: float
    peak_redis_commands_per_s: float
    active_params: int
    total_params: int
    tiers: list[TierLoad] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ceil(x: float) -> int:
    # Guard float noise: 3.0000000000000004 replicas is 3.
    return math.ceil(round(x, 9))


def choose_expert_shards(
    cfg: DeepseekV2Config,
    routed_bytes: float,
    all_weight_bytes: float,
    engine_budget: float,
    shard_budget: float,
) -> int:
    """Fewest shards whose slice of routed experts fits a shard's memory; 0 when the Engine
    holds every weight itself. Shard k owns experts [k*E/S, (k+1)*E/S), so S divides E."""
    experts = cfg.n_routed_experts or 0
    if experts == 0 or all_weight_bytes <= engine_budget:
        return 0
    for shards in range(1, experts + 1):
        if experts % shards == 0 and routed_bytes / shards <= shard_budget:
            return shards
    raise InputError(
        f"--gpu-memory-gib: even one expert per shard ({routed_bytes / experts / GIB:.1f} GiB) "
        "does not fit a shard; raise --gpus-per-expert-shard"
    )


def make_plan(a: Assumptions, cfg: DeepseekV2Config) -> Plan:
    warnings: list[str] = []
    try:
        weight_bytes = dtype_bytes(a.weight_dtype)
    except ValueError as e:
        raise InputError(f"--weight-dtype: {e}") from None
    try:
        kv_per_token = kv_cache_bytes_per_token(cfg, a.cache_dtype)
    except ValueError as e:
        raise InputError(f"--cache-dtype: {e}") from None

    # Traffic: a day's turns spread over its seconds, times the peak factor.
    turns_per_day = a.daily_users * a.turns_per_user
    average_turns = turns_per_day / SECONDS_PER_DAY
    peak_turns = average_turns * a.peak_factor
    peak_input = peak_turns * a.prompt_tokens
    peak_uncached = peak_input * (1 - a.cache_hit_rate)
    peak_output = peak_turns * a.reply_tokens

    # Engine throughput: decode and prefill shares of a replica's time add up.
    engine_load = peak_output / a.decode_tokens_per_s + peak_uncached / a.prefill_tokens_per_s
    replicas_throughput = max(1, _ceil(engine_load / a.target_utilization))

    # Weights: routed experts on the shards (if any), the rest on every Engine replica.
    counts = param_counts(cfg)
    all_weights = counts.total * weight_bytes
    routed = counts.routed_experts * weight_bytes
    gpu_bytes = a.gpu_memory_gib * GIB * a.memory_utilization
    engine_budget = a.gpus_per_engine * gpu_bytes
    shard_budget = a.gpus_per_expert_shard * gpu_bytes
    experts = cfg.n_routed_experts or 0
    if a.expert_shards is None:
        shards = choose_expert_shards(cfg, routed, all_weights, engine_budget, shard_budget)
    else:
        shards = a.expert_shards
        if shards and (experts == 0 or experts % shards):
            raise InputError(
                f"--expert-shards: {shards} does not divide the model's {experts} routed experts"
            )
        if shards and routed / shards > shard_budget:
            warnings.append(
                f"a shard's experts ({routed / shards / GIB:.1f} GiB) exceed its memory "
                f"({shard_budget / GIB:.1f} GiB): raise --expert-shards or --gpus-per-expert-shard"
            )
    engine_weights = all_weights - routed if shards else all_weights

    # KV cache: streams in flight = turns/s × seconds a reply streams; each holds its prompt
    # and reply in the latent cache (an upper bound: the prefix cache shares common prefixes).
    concurrent = peak_turns * a.reply_tokens / a.stream_tokens_per_s
    per_stream = (a.prompt_tokens + a.reply_tokens) * kv_per_token
    cache_room = engine_budget - engine_weights
    if cache_room <= 0:
        raise InputError(
            f"--gpus-per-engine: the Engine's weights ({engine_weights / GIB:.1f} GiB) leave no "
            f"room for a KV cache in {engine_budget / GIB:.1f} GiB; raise --gpus-per-engine, "
            "--gpu-memory-gib, or use expert shards"
        )
    replicas_memory = max(1, _ceil(concurrent * per_stream / cache_room))
    replicas = max(replicas_throughput, replicas_memory)
    if replicas_memory > replicas_throughput:
        warnings.append(
            f"the KV cache, not throughput, sets the Engine count ({replicas_memory} > "
            f"{replicas_throughput}): more memory per replica would need fewer"
        )

    # Expert shards: one set per `engines_per_expert_set` Engine replicas.
    sets = _ceil(replicas / a.engines_per_expert_set) if shards else 0
    group_limited = bool(shards) and bool(cfg.n_group) and cfg.n_group % shards == 0

    gateway = max(
        a.min_gateway_replicas,
        _ceil(peak_turns * a.requests_per_turn / (a.gateway_requests_per_s * a.target_utilization)),
    )
    tiers = [
        TierLoad(tier, share, peak_turns * share, engine_load * share)
        for tier, share in a.tier_mix.items()
    ]
    return Plan(
        turns_per_day=turns_per_day,
        average_turns_per_s=average_turns,
        peak_turns_per_s=peak_turns,
        peak_requests_per_s=peak_turns * a.requests_per_turn,
        input_tokens_per_day=turns_per_day * a.prompt_tokens,
        output_tokens_per_day=turns_per_day * a.reply_tokens,
        peak_input_tokens_per_s=peak_input,
        peak_uncached_input_tokens_per_s=peak_uncached,
        peak_output_tokens_per_s=peak_output,
        engine_load=engine_load,
        average_engine_load=engine_load / a.peak_factor,
        engine_replicas_for_throughput=replicas_throughput,
        concurrent_streams=concurrent,
        kv_cache_bytes_per_token=kv_per_token,
        kv_cache_bytes_per_stream=per_stream,
        engine_weight_bytes=engine_weights,
        engine_memory_bytes=engine_budget,
        engine_replicas_for_memory=replicas_memory,
        engine_replicas=replicas,
        kv_cache_gib_per_replica=concurrent * per_stream / replicas / GIB,
        expert_shards_per_set=shards,
        expert_sets=sets,
        expert_shard_replicas=sets * shards,
        expert_shard_weight_bytes=routed / shards if shards else 0.0,
        group_limited=group_limited,
        engine_gpus=replicas * a.gpus_per_engine,
        expert_gpus=sets * shards * a.gpus_per_expert_shard,
        gpus=replicas * a.gpus_per_engine + sets * shards * a.gpus_per_expert_shard,
        gateway_replicas=gateway,
        peak_redis_calls_per_s=peak_turns * a.redis_calls_per_turn,
        peak_redis_commands_per_s=peak_turns * a.redis_commands_per_turn,
        active_params=counts.active,
        total_params=counts.total,
        tiers=tiers,
        warnings=warnings,
    )
