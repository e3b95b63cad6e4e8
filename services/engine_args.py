"""``--device`` and ``--dtype``: one spelling for every command that starts an engine
(``dsv2 serve``, ``dsv2 model-plane``, ``dsv2 gateway --model``, ``dsv2 generate``), and the
load-shedding bounds for the commands that serve traffic.

Plain strings here, checked by ``EngineOptions`` where the engine starts, so the gateway's
command line does not import torch just to parse its flags.
"""

from __future__ import annotations

import argparse
from typing import Any

DEVICE_HELP = (
    "engine device: auto (CUDA when a GPU is visible, else CPU), cpu, cuda or cuda:N "
    "(default: auto; an explicit device that is missing is an error)"
)
DTYPE_HELP = "weights and cache dtype (default: auto = bfloat16 on CUDA, float32 on CPU)"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_engine_arguments(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """Add ``--device`` and ``--dtype``. ``default=None`` leaves them unset when not given
    (a config file's value then stands); commands without a config pass ``"auto"``."""
    parser.add_argument("--device", default=default, help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPES, default=default, help=DTYPE_HELP)


def _bound(text: str) -> int:
    """A queue bound: a whole number >= 0 (argparse names the flag when this raises)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_shedding_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-waiting-requests`` and ``--max-waiting-tokens`` (EngineOptions; unset: the
    config file's value, else no bound)."""
    parser.add_argument(
        "--max-waiting-requests",
        type=_bound,
        help="load shedding: refuse new free-tier requests (503 + Retry-After) while this many "
        "requests wait in an engine (default: no bound)",
    )
    parser.add_argument(
        "--max-waiting-tokens",
        type=_bound,
        help="load shedding: as --max-waiting-requests, counting the waiting prompt tokens",
    )


_OPTION_FLAGS = ("device", "dtype", "max_waiting_requests", "max_waiting_tokens")


def engine_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineOptions fields the flags set (only those given)."""
    return {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k, None) is not None}
