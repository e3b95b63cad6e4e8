"""Build and load the C++ CPU kernels of ``model/csrc/dsv2_cpu.cpp`` (few-row products).

The extension is compiled once per checkout with ``torch.utils.cpp_extension`` (g++ and
ninja) into ``build/dsv2_cpu`` beside the package, during ``make install`` (``python -m
model.cpu_ext``) or else on first use, with a log line saying so (about a minute). Where the
compiler, ninja or the build is missing or fails, ``load()`` returns None with the reason in
``why_unavailable()`` and every caller keeps torch's own path: start-up never fails because
of this. ``DSV2_CPU_EXT=0`` turns it off (the torch paths then run everywhere). A library
already in the build directory that was built from these very sources (the digest file
beside it) loads without any tool: the container image builds it in its builder stage and
the runtime stage, which has no compiler, sets ``DSV2_CPU_EXT_DIR`` to it.

The ops (``torch.ops.dsv2_cpu``):
- ``linear(x [M, K], w [N, K]) -> [M, N]`` float32 or bfloat16 row-major weights;
- ``moe(hidden, expert_ids, weights, gate_up, down, start)``: a MoE layer's routed experts;
- ``mla_decode`` / ``moe_decode`` / ``mlp_decode`` and the ``DecodePlan`` class: the fused
  decode step (model.fused_decode); ``argmax_rows``: greedy sampling; ``rms_norm``, ``rotary``;
- ``set_isa(level)`` / ``get_isa()`` / ``cpu_max_isa()``: which vector path runs (``ISA``
  below); set_isa clamps to what this CPU reports, so a wrong request never faults.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "DSV2_CPU_EXT"
NAME = "dsv2_cpu"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "dsv2_cpu.cpp"
# every file the build reads: a change to any of them rebuilds
SOURCES = [SOURCE, CSRC / "dsv2_decode.cpp", CSRC / "dsv2_plan.cpp"]
HEADERS = [CSRC / "dsv2_cpu.h"]
# beside the library: the sources_digest() it was built from
DIGEST_FILE = "sources.sha256"
# the C++ side's Isa enum: each level also runs everything below it
ISA = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops": torch.ops.dsv2_cpu or None, "why": reason if None


def build_dir() -> Path:
    """Where this checkout's build lives (the repo's ignored ``build/``; DSV2_CPU_EXT_DIR
    overrides it, e.g. for a read-only install)."""
    override = os.environ.get("DSV2_CPU_EXT_DIR")
    return Path(override) if override else SOURCE.parent.parent.parent / "build" / NAME


def _missing_tools() -> str | None:
    if sys.platform != "linux":
        return f"built only on Linux (this is {sys.platform})"
    for tool in ("ninja", os.environ.get("CXX", "c++")):
        if shutil.which(tool) is None and not (tool == "ninja" and _ninja_module()):
            return f"{tool} not found"
    return None


def _ninja_module() -> bool:
    try:
        import ninja  # noqa: F401  (the pip package puts a ninja binary on its own path)
    except ImportError:
        return False
    return True


def sources_digest() -> str:
    """sha256 of every file the build reads: a library built from other sources is stale."""
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _prebuilt() -> Path | None:
    """The library in build_dir() when it was built from these very sources (its digest
    file says so), else None. Such a library loads without a compiler: an image built with
    one (the Dockerfile's builder stage) runs its kernels where none is installed."""
    lib = build_dir() / f"{NAME}.so"
    stamp = build_dir() / DIGEST_FILE
    try:
        fresh = lib.is_file() and stamp.read_text().strip() == sources_digest()
    except OSError:
        return None
    return lib if fresh else None


def _build() -> object:
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    log.info("building the CPU kernels (%s) into %s: about a minute, once", CSRC.name, out)
    start = time.perf_counter()
    digest = sources_digest()
    cpp_extension.load(
        name=NAME,
        sources=[str(f) for f in SOURCES],
        build_directory=str(out),
        # baseline x86-64 code; the vector paths are per-function targets in the source.
        # -fopenmp: at::parallel_for is a header template whose threads are OpenMP pragmas
        # compiled into this library; without it every kernel here runs on one thread
        # (the soname resolves to the libgomp torch already loaded: one thread pool)
        extra_cflags=["-O3", "-std=c++17", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    (out / DIGEST_FILE).write_text(digest + "\n")
    log.info("built the CPU kernels in %.0f s", time.perf_counter() - start)
    return torch.ops.dsv2_cpu


def load() -> object | None:
    """``torch.ops.dsv2_cpu`` once built and loaded, else None (see ``why_unavailable``)."""
    with _lock:
        if "ops" not in _state:
            ops, why = None, None
            prebuilt = None
            if os.environ.get(ENV, "1").strip() in ("0", "false", "off", "no"):
                why = f"turned off by {ENV}"
            elif (prebuilt := _prebuilt()) is not None:
                try:
                    torch.ops.load_library(str(prebuilt))
                    ops = torch.ops.dsv2_cpu
                except Exception as e:  # a library built against another torch
                    why = f"prebuilt {prebuilt} failed to load: {str(e).strip()[:200]}"
                    log.warning("CPU kernels unavailable, using torch's kernels (%s)", why)
            else:
                why = _missing_tools()
            if why is None and ops is None:
                try:
                    ops = _build()
                except Exception as e:  # compiler errors, missing headers: keep torch's path
                    why = f"build failed: {str(e).strip().splitlines()[-1][:200]}"
                    log.warning("CPU kernels unavailable, using torch's kernels (%s)", why)
            _state["ops"], _state["why"] = ops, why
        return _state["ops"]


def why_unavailable() -> str | None:
    load()
    return _state["why"]  # type: ignore[return-value]


if __name__ == "__main__":  # make install: build now rather than at the first engine start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ops = load()
    if ops is None:
        print(f"CPU kernels not built ({why_unavailable()}); torch's kernels will be used")
    else:
        print(f"CPU kernels ready in {build_dir()} (best path here: isa {ops.cpu_max_isa()})")
