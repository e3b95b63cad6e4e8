"""A bfloat16 engine runs on an AVX2-only CPU: emulated here with DSV2_CPU_ISA=avx2, which also
caps oneDNN and ATen in the child process, so oneDNN's bf16 pre-packing would raise exactly as
it does on such a CPU if the engine still asked for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN_BF16_ENGINE = """
import logging, sys
import torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
torch.set_num_threads(1)
from services.engine import Engine, SamplingParams
engine = Engine.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
outs = engine.generate([[5, 6, 7, 8], list(range(2, 40)), [9]], params)
print("tokens", [len(o.token_ids) for o in outs])
print("lm_head packed", engine.model.lm_head.packed is not None)
print("cache", engine.runner.cache.dtype)
"""


def _run(checkpoint: Path, **env: str) -> str:
    child = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DSV2_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"}
    }
    child.update(env, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", RUN_BF16_ENGINE, str(checkpoint)],
        env=child,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bf16_engine_runs_on_avx2_through_the_fallback(engine_checkpoint: Path):
    out = _run(engine_checkpoint, DSV2_CPU_ISA="avx2")
    # the start-up line says which paths were chosen, and the engine kept bfloat16
    assert "cpu kernels: isa=avx2 (capped by DSV2_CPU_ISA=avx2) aten=AVX2" in out
    assert "onednn prepack: bf16 off" in out
    assert "tokens [8, 8, 8]" in out
    assert "lm_head packed False" in out
    assert "cache torch.bfloat16" in out
