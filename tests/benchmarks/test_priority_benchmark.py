"""benchmarks/priority.py runs end to end at tiny settings and reports both modes; what it
measures is timing (not asserted here), but first come first served can never shed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_priority_benchmark_smoke_run():
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/priority.py",
            *("--max-num-seqs", "2", "--free-tokens", "4", "--pro-tokens", "2"),
            *("--prompt-len", "16", "--pro-requests", "2", "--flood-batches", "2"),
            *("--deadline-batches", "3"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: the 2x target was missed
    out = result.stdout
    assert re.search(r"^idle\s+pro TTFT median\s+[\d.]+ ms", out, re.M), out
    assert re.search(r"^priority\s+pro TTFT median .* free sent\s+\d+: served", out, re.M), out
    fcfs = re.search(r"^fcfs .* served\s+(\d+), shed\s+(\d+), timed out\s+(\d+)", out, re.M)
    assert fcfs is not None, out
    assert int(fcfs.group(2)) == 0
    assert re.search(r"pro TTFT under the flood [\d.]+x idle \(target <= 2x\): (PASS|FAIL)", out)
