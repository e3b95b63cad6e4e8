"""The capacity arithmetic, checked against DeepSeek's published service figures and against
the model's own accounting."""

from __future__ import annotations

import pytest

from model.accounting import kv_cache_bytes_per_token, param_counts
from services.capacity.inputs import Assumptions, InputError, load_assumptions
from services.capacity.plan import GIB, load_model_config, make_plan

# DeepSeek, "Day 6 One More Thing: DeepSeek-V3/R1 Inference System Overview" (open-infra-index,
# 2025-03-01), statistics of its online service over 24 hours (2025-02-27 12:00 to 02-28 12:00,
# UTC+8), all on 8-GPU H800 nodes:
PUBLISHED_INPUT_TOKENS = 608e9  # input tokens that day ...
PUBLISHED_CACHED_INPUT_TOKENS = 342e9  # ... of which 342B (56.3%) hit the on-disk KV cache
PUBLISHED_HIT_RATE = 0.563
PUBLISHED_OUTPUT_TOKENS = 168e9  # output tokens that day
PUBLISHED_PREFILL_PER_NODE = 73_700  # input tokens/s per node during prefill, cache hits counted
PUBLISHED_DECODE_PER_NODE = 14_800  # output tokens/s per node during decode
PUBLISHED_STREAM_SPEED = 21  # "average output speed 20-22 tokens per second"
PUBLISHED_AVERAGE_NODES = 226.75  # average node occupancy over the day
PUBLISHED_PEAK_NODES = 278  # peak node occupancy
GPUS_PER_NODE = 8


def deepseek_service(**overrides) -> Assumptions:
    """DeepSeek's published day as capacity inputs. Only the day's totals are published, not
    users or per-turn lengths, so any split with the same totals will do (the plan only
    multiplies them): 1M users × 100 turns × 6,080 input and 1,680 output tokens."""
    values = dict(
        daily_users=1_000_000,
        turns_per_user=100,
        prompt_tokens=PUBLISHED_INPUT_TOKENS / 1e8,
        reply_tokens=PUBLISHED_OUTPUT_TOKENS / 1e8,
        cache_hit_rate=PUBLISHED_HIT_RATE,
        tier_mix="free=1",
        peak_factor=1,
        decode_tokens_per_s=PUBLISHED_DECODE_PER_NODE,
        # The plan counts computed (cache-missing) prompt tokens; DeepSeek's prefill figure
        # counts hits too, so a node computes (1 - hit rate) of its 73.7k tokens/s.
        prefill_tokens_per_s=PUBLISHED_PREFILL_PER_NODE * (1 - PUBLISHED_HIT_RATE),
        stream_tokens_per_s=PUBLISHED_STREAM_SPEED,
        gateway_requests_per_s=1000,
        redis_calls_per_turn=8,
        redis_commands_per_turn=42,
        gpus_per_engine=GPUS_PER_NODE,
        expert_shards=0,  # DeepSeek's nodes hold their experts: nothing outside the node
        target_utilization=1,  # the published figures are what the fleet did, not a target
    )
    values.update(overrides)
    return load_assumptions({}, values)


V2 = load_model_config("deepseek-v2")
V2_LITE = load_model_config("deepseek-v2-lite")


def test_published_figures_are_consistent() -> None:
    assert PUBLISHED_CACHED_INPUT_TOKENS / PUBLISHED_INPUT_TOKENS == pytest.approx(
        PUBLISHED_HIT_RATE, abs=5e-4
    )


def test_reproduces_deepseeks_average_fleet() -> None:
    """The day's tokens over the published per-node throughputs must give the published
    average of 226.75 busy nodes (decode 131.4 + prefill 95.5)."""
    plan = make_plan(deepseek_service(), V2)
    assert plan.input_tokens_per_day == pytest.approx(PUBLISHED_INPUT_TOKENS)
    assert plan.output_tokens_per_day == pytest.approx(PUBLISHED_OUTPUT_TOKENS)
    assert plan.average_engine_load == pytest.approx(PUBLISHED_AVERAGE_NODES, rel=0.005)
    assert plan.engine_replicas_for_throughput == 227


def test_reproduces_deepseeks_peak_fleet() -> None:
    """With their peak-to-average occupancy as the peak factor, the plan needs their peak node
    count (within one node: the published average is rounded) and 8 GPUs a node."""
    plan = make_plan(
        deepseek_service(peak_factor=PUBLISHED_PEAK_NODES / PUBLISHED_AVERAGE_NODES), V2
    )
    assert abs(plan.engine_replicas_for_throughput - PUBLISHED_PEAK_NODES) <= 1
    nodes = plan.engine_replicas
    assert plan.engine_gpus == GPUS_PER_NODE * nodes
    # The memory bound is not compared: DeepSeek serves V3 in FP8 and spreads experts over
    # many nodes; this plan holds bf16 DeepSeek-V2 whole on each node.


def test_cache_hits_are_what_keeps_deepseeks_fleet_that_small() -> None:
    """Without the 56.3% cache hits every input token is computed: the same nodes would have
    to grow by the hit share of prefill work (95.5 / 0.437 - 95.5 = 123 more nodes)."""
    with_cache = make_plan(deepseek_service(), V2).average_engine_load
    without = make_plan(deepseek_service(cache_hit_rate=0), V2).average_engine_load
    prefill_nodes = PUBLISHED_INPUT_TOKENS / 86_400 / PUBLISHED_PREFILL_PER_NODE
    assert without - with_cache == pytest.approx(
        prefill_nodes * PUBLISHED_HIT_RATE / (1 - PUBLISHED_HIT_RATE), rel=1e-9
    )
    assert without > PUBLISHED_PEAK_NODES


def test_headroom_and_peak_scale_replicas() -> None:
    base = make_plan(deepseek_service(), V2)
    busier = make_plan(deepseek_service(peak_factor=2, target_utilization=0.5), V2)
    assert busier.engine_load == pytest.approx(2 * base.engine_load)
    assert busier.engine_replicas_for_throughput == pytest.approx(
        4 * base.average_engine_load, abs=1
    )


def test_kv_cache_from_model_accounting() -> None:
    """KV bytes per token are DeepSeek-V2's MLA latent (60 layers × (512 + 64) × 2 bytes), and
    a stream holds its prompt and reply."""
    plan = make_plan(deepseek_service(), V2)
    assert plan.kv_cache_bytes_per_token == kv_cache_bytes_per_token(V2, "bfloat16") == 69_120
    assert plan.kv_cache_bytes_per_stream == (6080 + 1680) * 69_120
    # Little's law: output tokens/s over a stream's tokens/s = streams in flight.
    assert plan.concurrent_streams == pytest.approx(
        PUBLISHED_OUTPUT_TOKENS / 86_400 / PUBLISHED_STREAM_SPEED
    )


def test_memory_bound_raises_replicas_when_the_cache_does_not_fit() -> None:
    """Slow streams hold their cache longer: past what the nodes' memory holds beside the
    weights, the plan adds replicas for memory, and says so."""
    fast = make_plan(deepseek_service(stream_tokens_per_s=1000), V2)
    slow = make_plan(deepseek_service(stream_tokens_per_s=5), V2)
    assert fast.engine_replicas == fast.engine_replicas_for_throughput
    assert slow.engine_replicas == slow.engine_replicas_for_memory > fast.engine_replicas
    cache_room = slow.engine_memory_bytes - slow.engine_weight_bytes
    assert slow.kv_cache_gib_per_replica * GIB <= cache_room
    assert any("KV cache" in w for w in slow.warnings)


def test_expert_shards_chosen_from_model_size() -> None:
    """bf16 DeepSeek-V2 (236B) does not fit one 80 GiB GPU: its routed experts go to the
    fewest shards that hold them, a divisor of 160 experts and of n_group=8 (device-limited
    routing). V2-Lite (15.7B) fits beside its cache: its experts stay in the Engine."""
    one_gpu = dict(gpus_per_engine=1, expert_shards="auto", engines_per_expert_set=4)
    plan = make_plan(deepseek_service(**one_gpu), V2)
    routed = param_counts(V2).routed_experts * 2
    budget = 80 * GIB * 0.9
    shards = plan.expert_shards_per_set
    assert routed / shards <= budget
    assert all(routed / fewer > budget for fewer in range(1, shards) if 160 % fewer == 0)
    assert shards == 8 and 160 % shards == 0 and plan.group_limited
    assert plan.expert_sets == -(-plan.engine_replicas // 4)
    assert plan.gpus == plan.engine_replicas + plan.expert_sets * shards
    assert (
        plan.engine_weight_bytes == (param_counts(V2).total - param_counts(V2).routed_experts) * 2
    )

    lite = make_plan(deepseek_service(**one_gpu), V2_LITE)
    assert lite.expert_shards_per_set == 0 and lite.expert_gpus == 0
    assert lite.engine_weight_bytes == param_counts(V2_LITE).total * 2


def test_tier_mix_splits_the_load() -> None:
    plan = make_plan(deepseek_service(tier_mix="free=0.9,pro=0.09,internal=0.01"), V2)
    assert [t.tier for t in plan.tiers] == ["free", "pro", "internal"]
    assert sum(t.engine_load for t in plan.tiers) == pytest.approx(plan.engine_load)
    assert plan.tiers[1].peak_turns_per_s == pytest.approx(0.09 * plan.peak_turns_per_s)


def test_gateway_and_redis_scale_with_turns() -> None:
    plan = make_plan(deepseek_service(gateway_requests_per_s=100, requests_per_turn=2), V2)
    turns = 1e8 / 86_400
    assert plan.peak_redis_calls_per_s == pytest.approx(8 * turns)
    assert plan.peak_redis_commands_per_s == pytest.approx(42 * turns)
    assert plan.gateway_replicas == -(-2 * turns // 100)  # ceil, at 100% utilization here
    quiet = make_plan(deepseek_service(daily_users=10), V2)
    assert quiet.gateway_replicas == 2  # never fewer than --min-gateway-replicas
    assert quiet.engine_replicas == 1


@pytest.mark.parametrize(
    ("override", "flag"),
    [
        ({"expert_shards": 7}, "--expert-shards"),  # 160 experts do not split in 7
        ({"weight_dtype": "int3"}, "--weight-dtype"),
        ({"cache_dtype": "fp7"}, "--cache-dtype"),
        ({"gpus_per_engine": 1, "expert_shards": 0}, "--gpus-per-engine"),  # 236B on one GPU
    ],
)
def test_impossible_deployments_name_the_flag(override: dict, flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        make_plan(deepseek_service(**override), V2)


def test_plan_is_json_ready() -> None:
    data = make_plan(deepseek_service(), V2).to_dict()
    assert data["engine_replicas_for_throughput"] == 227
    assert data["tiers"] == [
        {
            "tier": "free",
            "share": 1.0,
            "peak_turns_per_s": 1e8 / 86_400,
            "engine_load": data["engine_load"],
        }
    ]
