"""How a plan is shown: a rich table for people, JSON for scripts.

The table is rendered without colour at a fixed width, so the same plan prints the same text
everywhere (docs/capacity.md embeds it and a test compares the two).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

from rich import box
from rich.console import Console
from rich.table import Table

from services.capacity.inputs import Assumptions
from services.capacity.plan import GIB, Plan

WIDTH = 96


def _n(x: float) -> str:
    """Readable magnitudes: 1,234 / 12.3k / 4.56M / 7.89B."""
    for threshold, unit, suffix in ((1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(x) >= threshold:
            short = f"{x / unit:.3g}"
            # .3g turns 999.9 into 1e+03 and 12345 into 1.23e+04: whole numbers instead.
            return (f"{x / unit:,.0f}" if "e" in short else short) + suffix
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _rows(plan: Plan, a: Assumptions) -> list[tuple[str, str, str]]:
    shards = (
        f"{plan.expert_shards_per_set} per set × {plan.expert_sets} sets"
        if plan.expert_shards_per_set
        else "none: experts run in the Engine"
    )
    group = (
        "a token meets at most topk_group shards"
        if plan.group_limited
        else ("n_group not a multiple of the shards" if plan.expert_shards_per_set else "")
    )
    return [
        ("Traffic", "", ""),
        ("turns a day", _n(plan.turns_per_day), f"{_n(a.daily_users)} users × {a.turns_per_user:g}"),
        ("turns/s, average → peak", f"{_n(plan.average_turns_per_s)} → {_n(plan.peak_turns_per_s)}", f"peak factor {a.peak_factor:g}"),
        ("input tokens/s at peak", _n(plan.peak_input_tokens_per_s), f"{_n(plan.peak_uncached_input_tokens_per_s)} computed, {a.cache_hit_rate:.1%} from cache"),
        ("output tokens/s at peak", _n(plan.peak_output_tokens_per_s), f"{a.reply_tokens:g} per turn"),
        ("streams at once at peak", _n(plan.concurrent_streams), f"replies stream at {a.stream_tokens_per_s:g} tok/s"),
        ("Engine", "", ""),
        ("model weights", f"{_n(plan.total_params)} params", f"{_n(plan.active_params)} active per token, {a.weight_dtype}"),
        ("busy replicas at peak", f"{plan.engine_load:.2f}", f"{plan.average_engine_load:.2f} on average"),
        ("replicas for throughput", str(plan.engine_replicas_for_throughput), f"at {a.target_utilization:.0%} of measured"),
        ("replicas for KV cache", str(plan.engine_replicas_for_memory), f"{plan.kv_cache_bytes_per_token:,} B/token, {plan.kv_cache_bytes_per_stream / GIB:.2f} GiB/stream"),
        ("Engine replicas", str(plan.engine_replicas), f"{a.gpus_per_engine} GPU{'s' if a.gpus_per_engine > 1 else ''} each, weights {plan.engine_weight_bytes / GIB:.1f} GiB + cache {plan.kv_cache_gib_per_replica:.1f} GiB"),
        ("Experts", "", ""),
        ("expert shards", str(plan.expert_shard_replicas), shards),
        ("experts per shard", f"{plan.expert_shard_weight_bytes / GIB:.1f} GiB" if plan.expert_shards_per_set else "-", group),
        ("Totals", "", ""),
        ("GPUs", str(plan.gpus), f"{plan.engine_gpus} Engine + {plan.expert_gpus} expert"),
        ("gateway replicas", str(plan.gateway_replicas), f"{_n(plan.peak_requests_per_s)} requests/s at peak"),
        ("Redis calls/s at peak", _n(plan.peak_redis_calls_per_s), f"{a.redis_calls_per_turn:g} per turn"),
        ("Redis commands/s at peak", _n(plan.peak_redis_commands_per_s), f"{a.redis_commands_per_turn:g} per turn, inside Lua too"),
    ]  # fmt: skip


def render_table(plan: Plan, a: Assumptions) -> str:
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, color_system=None, force_terminal=False)
    table = Table(title=f"dsv2 capacity: {a.model}", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("plan", justify="right", no_wrap=True)
    table.add_column("from")
    for name, value, note in _rows(plan, a):
        if not value and not note:
            table.add_section()
            table.add_row(f"[bold]{name}[/bold]")
        else:
            table.add_row(f"  {name}", value, note)
    console.print(table)
    tiers = Table(title="by tier (turn shares)", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("tier", "share", "turns/s at peak", "busy Engine replicas"):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    for t in plan.tiers:
        tiers.add_row(t.tier, f"{t.share:.1%}", _n(t.peak_turns_per_s), f"{t.engine_load:.2f}")
    console.print(tiers)
    for warning in plan.warnings:
        console.print(f"warning: {warning}")
    # Rich pads lines to the table's width; trailing spaces only make diffs noisy.
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def render_json(plan: Plan, a: Assumptions) -> str:
    return json.dumps({"assumptions": asdict(a), "plan": plan.to_dict()}, indent=2) + "\n"
