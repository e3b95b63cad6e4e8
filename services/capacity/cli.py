"""`dsv2 capacity`: plan replicas and GPUs for a traffic estimate.

    dsv2 capacity --config docs/capacity-example.yaml [--daily-users 2e6 ...] [--json]

Every input is a flag or a key of the YAML file (flags win). Exit 0 with the plan, 2 when an
input is missing or wrong (the message names the flag).
"""

from __future__ import annotations

import argparse
import sys

from services.capacity.inputs import (
    InputError,
    add_input_arguments,
    load_assumptions,
    read_config_file,
)
from services.capacity.plan import load_model_config, make_plan
from services.capacity.report import render_json, render_table

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Turn traffic assumptions and measured per-replica figures into Engine replicas, "
        "expert shards, GPUs, gateway replicas and Redis operations per second."
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file of inputs (keys: flag names with _)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_input_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        file_values = read_config_file(args.config) if args.config else {}
        assumptions = load_assumptions(file_values, vars(args))
        plan = make_plan(assumptions, load_model_config(assumptions.model))
    except InputError as e:
        print(f"dsv2 capacity: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    render = render_json if args.json else render_table
    sys.stdout.write(render(plan, assumptions))
    return 0
