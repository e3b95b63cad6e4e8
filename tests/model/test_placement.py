"""model.placement: device and dtype options resolve against this process's hardware; an
explicit choice the hardware cannot honour is an error naming the option, never a fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.placement import (
    PlacementError,
    check_device_name,
    dtype_name,
    resolve_device,
    resolve_dtype,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_unknown_device_names_the_option_and_the_choices(name):
    with pytest.raises(PlacementError, match=r"device=.* is not a device: use one of auto, cpu"):
        check_device_name(name)
    with pytest.raises(PlacementError, match="is not a device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["float8", "int8", "float64", "half"])
def test_unknown_dtype_names_the_option_and_the_choices(name):
    with pytest.raises(PlacementError, match=rf"dtype='{name}' is not supported: use one of auto"):
        dtype_name(name)


def test_dtype_spellings():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name("float16") == "float16"
    with pytest.raises(PlacementError, match="float64"):
        dtype_name(torch.float64)


def test_cpu_and_auto():
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu")
    # auto: bfloat16 on CUDA, float32 on the CPU; explicit dtypes are kept as asked
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


NO_GPU_CHECK = """
import sys
from model.placement import PlacementError, resolve_device
assert resolve_device("auto").type == "cpu"  # auto takes the CPU when no GPU is visible
for name in ("cuda", "cuda:0", "cuda:3"):
    try:
        resolve_device(name)
    except PlacementError as e:
        print(e)
    else:
        sys.exit(f"{name} resolved without a GPU")
"""


def test_cuda_without_a_visible_gpu_is_an_error():
    # a fresh process with every GPU hidden (the state of any machine without one)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_GPU_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for name, line in zip(("cuda", "cuda:0", "cuda:3"), lines, strict=True):
        assert line.startswith(f"device='{name}' but no CUDA GPU is visible to this process")
        assert "use device='cpu'" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA GPU")
def test_cuda_index_past_the_last_gpu_is_an_error():
    count = torch.cuda.device_count()
    with pytest.raises(PlacementError, match=f"sees {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")
    assert resolve_device("cuda").index is not None
