"""benchmarks/gpu_check.py without a GPU: its CPU smoke mode runs every step (checkpoint,
exactness with the captured step on and off, speed, cache bytes) on a tiny model, and asking
for CUDA where none is visible stops at once with a message saying so."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


def test_cpu_smoke_run_passes_every_check(capsys):
    assert (
        gpu_check.main(["--device", "cpu", "--tiny", "--streams", "1,3", "--new-tokens", "6"]) == 0
    )
    out = capsys.readouterr().out
    assert "exactness (graphs on): 3 streams x 6 tokens" in out
    assert "exactness (graphs off)" in out and "FAIL" not in out
    assert "   3 streams: transformers" in out and "graphs on" in out
    assert "latent cache:" in out and "overall: PASS" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_without_cuda_it_fails_fast_and_says_why(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cuda"])
    assert exc.value.code == gpu_check.EXIT_NO_DEVICE
    assert "no CUDA device is visible" in capsys.readouterr().err
