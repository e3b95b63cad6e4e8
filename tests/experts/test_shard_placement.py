"""An expert shard loads its slice straight onto its device in its dtype ("auto" resolves in
the shard's process), and refuses a device this process does not have."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from services.experts import load_shard

ROOT = Path(__file__).resolve().parents[2]


def test_slice_loads_onto_the_device_asked_for_not_the_default_one(tiny_checkpoint):
    torch.set_default_device("meta")  # a tensor made without the shard's device lands here
    try:
        experts, spec = load_shard(tiny_checkpoint, 1, 2, "bfloat16", "cpu")
    finally:
        torch.set_default_device(None)
    assert (spec.expert_start, spec.expert_end, spec.dtype) == (4, 8, torch.bfloat16)
    params = [p for module in experts.values() for p in module.parameters()]
    assert params and {(p.device.type, p.dtype) for p in params} == {("cpu", torch.bfloat16)}


def test_auto_dtype_on_the_cpu_is_float32(tiny_checkpoint):
    if torch.cuda.is_available():
        _, spec = load_shard(tiny_checkpoint, 0, 2, device="cpu")
    else:
        _, spec = load_shard(tiny_checkpoint, 0, 2)  # auto device: the CPU here
    assert spec.dtype == torch.float32


def test_shard_command_refuses_a_missing_gpu(tiny_checkpoint):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.experts",
            "--model",
            str(tiny_checkpoint),
            "--shard",
            "0",
            "--num-shards",
            "2",
            "--device",
            "cuda",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: device='cuda' but no CUDA GPU is visible" in proc.stderr
