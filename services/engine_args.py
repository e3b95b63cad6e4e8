"""``--device`` and ``--dtype``: one spelling for every command that starts an engine
(``dsv2 serve``, ``dsv2 model-plane``, ``dsv2 gateway --model``, ``dsv2 generate``).

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


def engine_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineOptions fields the flags set (only those given)."""
    return {k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k) is not None}
