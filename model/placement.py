"""Where the engine runs and in which dtype: the ``device`` and ``dtype`` engine options.

Two steps, so a config can be checked where it is written (a laptop, the Ray driver) and
placed where it runs (a Ray replica that got a GPU):
- ``check_device_name`` / ``check_dtype_name``: the spelling only, no hardware looked at;
- ``resolve_device`` / ``resolve_dtype``: against this process's hardware. An explicit choice
  the hardware cannot honour is an error naming the option, never a silent fallback; only
  ``auto`` picks (CUDA when a GPU is visible, else the CPU; bfloat16 on CUDA, float32 on CPU).
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlacementError(ValueError):
    """A device or dtype option this process cannot honour; the message names the option."""


def check_device_name(name: str) -> str:
    """``name`` if it spells a device option, else PlacementError saying what is accepted."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise PlacementError(
            f"device={name!r} is not a device: use one of {', '.join(DEVICE_CHOICES)}"
        )
    return name


def dtype_name(dtype: str | torch.dtype) -> str:
    """The option spelling of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``), checked."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = dtype
    if name not in DTYPE_CHOICES:
        raise PlacementError(
            f"dtype={name!r} is not supported: use one of {', '.join(DTYPE_CHOICES)}"
        )
    return name


def resolve_device(name: str) -> torch.device:
    """The torch device for a device option in this process; ``cuda`` where no GPU is visible
    (or ``cuda:N`` past the last one) is an error, not a fallback to the CPU."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(
                f"device={name!r} but no CUDA GPU is visible to this process "
                "(torch.cuda.is_available() is False): use device='cpu', or 'auto' to take "
                "a GPU only when there is one"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PlacementError(
                f"device={name!r} but this process sees {count} CUDA GPU(s): "
                f"use cuda:0..cuda:{count - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype for a dtype option on ``device``: ``auto`` is bfloat16 on CUDA and
    float32 on the CPU; a dtype the device cannot compute in is an error naming both."""
    name = dtype_name(name)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = _DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16:
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, _ = torch.cuda.get_device_capability(index)
        if major < 8:  # bf16 arithmetic needs Ampere (sm_80) or newer
            raise PlacementError(
                f"dtype='bfloat16' but {device} is sm_{major}x, which has no bfloat16 "
                "arithmetic (Ampere, sm_80, or newer): use dtype='float16' or 'float32'"
            )
    # On the CPU torch computes all three everywhere (bf16/fp16 emulated through float32
    # where the CPU lacks them: slower, not wrong; model.kernels' start-up line says so).
    return dtype
