"""model.kernels: CPU fast paths follow the detected features, DSV2_CPU_ISA caps them, and a
path oneDNN refuses on this CPU is turned off by the probe instead of raising."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.kernels import ISA_ENV, ISA_LEVELS, CpuFeatures, cpu_kernels, describe

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (oneDNN and ATen read their ISA caps once per
    process) and return its stdout; the child's error is the failure message."""
    child_env = {k: v for k, v in os.environ.items() if k not in {ISA_ENV, "ONEDNN_MAX_CPU_ISA"}}
    child_env.pop("ATEN_CPU_CAPABILITY", None)
    child_env.update(env, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cap_keeps_only_the_named_level(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "avx2")
    capped = CpuFeatures.detect()
    assert capped.flags <= ISA_LEVELS["avx2"]
    assert capped.level in {"avx2", "below-avx2"}
    assert not capped.avx512 and not capped.native_bf16


def test_unknown_cap_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match="DSV2_CPU_ISA='avx9000' is not one of avx2, avx512"):
        CpuFeatures.detect()


def test_describe_names_every_choice():
    line = describe("cpu")
    for part in ("isa=", "onednn prepack: bf16", "fp16", "half few-row forms", "bf16 arithmetic"):
        assert part in line
    plan = cpu_kernels()
    assert ("bf16 on" in line) == plan.can_prepack(torch.bfloat16)


def test_prepack_needs_the_features_oneDNN_needs():
    plan = cpu_kernels()
    f = plan.features
    if plan.can_prepack(torch.bfloat16):
        assert f.avx512 or f.has("avx_ne_convert")
    if plan.can_prepack(torch.float16):
        assert f.has("avx512_fp16") or f.has("avx_ne_convert")


AVX2_CHECK = """
import torch
from model.kernels import cpu_kernels
from model.linear import Linear
plan = cpu_kernels()
print(plan.describe())
layer = Linear(64, 48).to(torch.bfloat16)
layer.prepack_for_inference()  # must not raise on this CPU
x = torch.randn(20, 64).bfloat16()
with torch.inference_mode():
    y = layer(x)
assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
print("packed", layer.packed is not None)
"""


def test_capped_at_avx2_turns_prepack_off_and_runs():
    out = _python(AVX2_CHECK, DSV2_CPU_ISA="avx2")
    # the cap also reached ATen (vector kernels as on an AVX2 CPU)
    assert "isa=avx2 (capped by DSV2_CPU_ISA=avx2) aten=AVX2" in out
    assert "bf16 off (needs avx512bw/vl/dq or avx_ne_convert)" in out
    assert "bf16 arithmetic emulated" in out
    assert "packed False" in out


def test_probe_catches_what_onednn_refuses():
    # detection alone would allow pre-packing on an AVX-512 CPU; oneDNN capped at AVX2 raises
    # on it, exactly as on an AVX2-only CPU, and the probe turns the path off instead
    out = _python(AVX2_CHECK, ONEDNN_MAX_CPU_ISA="AVX2")
    assert "packed False" in out
    if cpu_kernels().features.avx512:
        assert "bf16 off (mkldnn_reorder_linear_weight: bf16 path needs" in out


def test_first_detection_inside_autocast_chooses_as_outside():
    # the probe's float32 reference must stay float32 when the first model call runs inside a
    # caller's autocast region (it raised "Float did not match BFloat16" there)
    code = (
        "import torch\n"
        "from model.kernels import cpu_kernels\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    print(cpu_kernels().describe())\n"
    )
    assert _python(code).strip() == cpu_kernels().describe()
