"""Which fast paths this process may use, chosen once at runtime from what the hardware has.

The CPUs this code meets differ (AVX2-only AMD Zen 3, AVX-512 + avx512_bf16 Zen 5, Intel Xeon
with AMX), and some of PyTorch's fast paths raise on the older ones: oneDNN's half-precision
weight pre-packing (``torch.ops.mkldnn._reorder_linear_weight``) refuses bf16 without
avx512bw/vl/dq or avx_ne_convert, and fp16 without avx512_fp16 or avx_ne_convert. So every
path here is decided from the detected features, risky ones are also probed once on a tiny
weight (an error means "not here", never a crash), and each has a plain fallback.

Override for tests and for operators reproducing another machine: ``DSV2_CPU_ISA`` caps the
detected CPU features at one level (``avx2`` < ``avx512`` < ``avx512_bf16`` < ``amx``). A
process started with it also gets ``ONEDNN_MAX_CPU_ISA`` and ``ATEN_CPU_CAPABILITY`` capped
to match, when those are unset, so oneDNN and ATen's vector kernels behave as on that CPU
(they read them once, before their first use: set ``DSV2_CPU_ISA`` before starting Python).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ISA_ENV = "DSV2_CPU_ISA"
# levels DSV2_CPU_ISA accepts, lowest first; each names the features it keeps
ISA_LEVELS: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "avx512": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "avx512_bf16": frozenset(
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
    ),
    "amx": frozenset(
        {
            *("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
            *("avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_bf16", "amx_fp16"),
        }
    ),
}
# what oneDNN and ATen are capped to for each level (their own spellings)
_ONEDNN_ISA = {"avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16"}
_ATEN_ISA = {"avx2": "avx2"}
# the flags /proc/cpuinfo spells that the decisions below look at
_FLAGS = ISA_LEVELS["amx"]


def _isa_cap() -> str | None:
    """The level DSV2_CPU_ISA names (None when unset); an unknown name is an error."""
    cap = os.environ.get(ISA_ENV, "").strip().lower()
    if not cap:
        return None
    if cap not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={cap!r} is not one of {', '.join(ISA_LEVELS)}")
    return cap


def _cap_backends() -> None:
    """Apply DSV2_CPU_ISA to oneDNN and ATen where the caller did not choose already (runs at
    import, before this module's probes touch oneDNN)."""
    cap = _isa_cap()
    if cap is None:
        return
    if cap in _ONEDNN_ISA:
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _ONEDNN_ISA[cap])
    if cap in _ATEN_ISA:
        os.environ.setdefault("ATEN_CPU_CAPABILITY", _ATEN_ISA[cap])


_cap_backends()


def _cpuinfo_flags() -> set[str] | None:
    """The flags line of /proc/cpuinfo (Linux); None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _torch_flags() -> set[str]:
    """What PyTorch's own cpuinfo reports (other operating systems)."""
    cpu = torch.cpu
    flags = set()
    if getattr(cpu, "_is_avx2_supported", lambda: False)():
        flags |= {"avx2", "fma", "f16c"}
    if getattr(cpu, "_is_avx512_supported", lambda: False)():
        flags |= {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        flags.add("amx_bf16")
    if getattr(cpu, "_is_amx_fp16_supported", lambda: False)():
        flags.add("amx_fp16")
    return flags


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features the kernel choices depend on (after any DSV2_CPU_ISA cap)."""

    flags: frozenset[str]
    capped_at: str | None = None

    @classmethod
    def detect(cls) -> CpuFeatures:
        found = _cpuinfo_flags()
        flags = (found if found is not None else _torch_flags()) & _FLAGS
        cap = _isa_cap()
        if cap is not None:
            flags &= ISA_LEVELS[cap]
        return cls(frozenset(flags), cap)

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    @property
    def avx512(self) -> bool:
        return self.has("avx512f", "avx512bw", "avx512vl", "avx512dq")

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (avx512_bf16 or AMX); without them bf16 arithmetic
        is converted to float32 element by element and runs several times slower than fp32
        (DESIGN.md: absorbed decode 58.8 ms bf16 against 8.5 ms fp32 on Zen 3)."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def native_fp16(self) -> bool:
        return self.has("avx512_fp16") or self.has("amx_fp16")

    @property
    def level(self) -> str:
        """The highest DSV2_CPU_ISA level these features reach (``below-avx2`` if none)."""
        best = "below-avx2"
        for name, needed in ISA_LEVELS.items():
            if name == "amx":
                if self.has("amx_bf16", "avx512_bf16") and self.avx512:
                    best = name
            elif needed <= self.flags:
                best = name
        return best


def _probe_prepack(dtype: torch.dtype) -> str | None:
    """Pre-pack a tiny weight and multiply by it once: None when that works and matches
    F.linear, else why not (oneDNN raises on CPUs it does not support for this dtype)."""
    if not torch.backends.mkldnn.is_available():
        return "PyTorch built without oneDNN"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g).to(dtype)
    x = torch.randn(4, 32, generator=g).to(dtype)
    try:
        # autocast off: the first detection may run inside a caller's autocast region, which
        # would turn the float32 reference into bf16 and fail the comparison below
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            want = F.linear(x.float(), w.float())
    except RuntimeError as e:  # the message names the missing CPU feature
        return str(e).strip().splitlines()[0]
    if not torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2):
        return "pre-packed product disagrees with F.linear"
    return None


@dataclass(frozen=True)
class CpuKernels:
    """The CPU fast paths this process uses; each ``False`` means the plain fallback.

    - ``prepack``: dtype -> oneDNN pre-packed weights for products of 2+ rows (model.linear);
      fallback F.linear / the weight-left product. Needs avx512bw/vl/dq or avx_ne_convert
      for bf16, avx512_fp16 or avx_ne_convert for fp16, and a probe that succeeds.
    - ``half_few_rows``: the few-row bf16/fp16 forms of model.linear (torch.mv for one row,
      weight on the left for 2-16); ATen kernels with a scalar path, so on everywhere.
    - ``native_bf16`` / ``native_fp16``: half-precision arithmetic in hardware. Without it
      the dtype still works (storage and results in that dtype) but computes slower than
      float32; the log line says so, the dtype is never changed behind the user's back.
    - ``ext``: the vector path of this project's C++ kernels (``model.cpu_ext``: few-row
      linear, fused routed experts; float32 and bfloat16) or None, then ``ext_why`` says
      why and torch's kernels run. ``scalar`` is never chosen (torch's are faster there);
      tests reach it with ``use_ext_isa``.
    """

    features: CpuFeatures
    prepack: dict[torch.dtype, bool] = field(default_factory=dict)
    why_not: dict[torch.dtype, str] = field(default_factory=dict)
    half_few_rows: bool = True
    ext: str | None = None
    ext_why: str | None = None
    # torch.ops.dsv2_cpu when ``ext`` is on, else None (kept here: looked up on every call)
    ext_ops: object | None = field(default=None, repr=False, compare=False)

    @property
    def native_bf16(self) -> bool:
        return self.features.native_bf16

    @property
    def native_fp16(self) -> bool:
        return self.features.native_fp16

    def can_prepack(self, dtype: torch.dtype) -> bool:
        return self.prepack.get(dtype, False)

    def describe(self) -> str:
        """One line for the start-up log: the CPU level and each path chosen."""
        f = self.features
        level = f.level + (f" (capped by {ISA_ENV}={f.capped_at})" if f.capped_at else "")

        def pp(dtype: torch.dtype, name: str) -> str:
            if self.can_prepack(dtype):
                return f"{name} on"
            return f"{name} off ({self.why_not.get(dtype, 'not probed')})"

        ext = f"on ({self.ext})" if self.ext else f"off ({self.ext_why})"
        return (
            f"cpu kernels: isa={level} aten={torch.backends.cpu.get_cpu_capability()}; "
            f"dsv2 few-row linear + fused experts {ext}; "
            f"onednn prepack: {pp(torch.bfloat16, 'bf16')}, {pp(torch.float16, 'fp16')}; "
            f"half few-row forms {'on' if self.half_few_rows else 'off'}; "
            f"bf16 arithmetic {'native' if f.native_bf16 else 'emulated (slower than fp32)'}; "
            f"fp16 arithmetic {'native' if f.native_fp16 else 'emulated (slower than fp32)'}"
        )


def _choose_prepack(features: CpuFeatures, dtype: torch.dtype) -> str | None:
    """None when pre-packing ``dtype`` is safe here, else the reason it is off."""
    if dtype == torch.bfloat16:
        if not (features.avx512 or features.has("avx_ne_convert")):
            return "needs avx512bw/vl/dq or avx_ne_convert"
    elif not (features.has("avx512_fp16") or features.has("avx_ne_convert")):
        return "needs avx512_fp16 or avx_ne_convert"
    return _probe_prepack(dtype)


_chosen: CpuKernels | None = None


def cpu_kernels() -> CpuKernels:
    """The CPU kernel choices of this process (detected and probed once). Memoised in a
    plain global rather than functools.cache: TorchDynamo (the captured decode step's trace)
    reads a global as a constant, but traces through a cache wrapper into the detection."""
    global _chosen
    if _chosen is None:
        _chosen = _choose_cpu_kernels()
    return _chosen


def _choose_cpu_kernels() -> CpuKernels:
    features = CpuFeatures.detect()
    prepack: dict[torch.dtype, bool] = {}
    why_not: dict[torch.dtype, str] = {}
    for dtype in (torch.bfloat16, torch.float16):
        reason = _choose_prepack(features, dtype)
        prepack[dtype] = reason is None
        if reason is not None:
            why_not[dtype] = reason
    ext, ext_why, ops = _choose_ext(features)
    return CpuKernels(features, prepack, why_not, ext=ext, ext_why=ext_why, ext_ops=ops)


# the C++ kernels' path for each DSV2_CPU_ISA level (AMX: its vdpbf16ps path)
_EXT_FOR_LEVEL = {"amx": "avx512_bf16", "avx512_bf16": "avx512_bf16", "avx512": "avx512"}
_EXT_FOR_LEVEL["avx2"] = "avx2"


def _choose_ext(features: CpuFeatures) -> tuple[str | None, str | None, object | None]:
    """(path, None, ops) when the C++ kernels load and this CPU has a vector path for them,
    else (None, why not, None)."""
    wanted = _EXT_FOR_LEVEL.get(features.level)
    if wanted is None:
        return None, "needs avx2 and fma", None
    from model import cpu_ext

    ops = cpu_ext.load()
    if ops is None:
        return None, cpu_ext.why_unavailable(), None
    got = int(ops.set_isa(cpu_ext.ISA[wanted]))
    return {v: k for k, v in cpu_ext.ISA.items()}[got], None, ops


_EXT_DTYPES = (torch.float32, torch.bfloat16)


def ext_for(*tensors: torch.Tensor):
    """``torch.ops.dsv2_cpu`` when its kernels may compute on ``tensors`` (CPU, float32 or
    bfloat16 alike, no autograd, not inside a torch.compile trace), else None."""
    ops = cpu_kernels().ext_ops
    if ops is None or torch.compiler.is_compiling():
        return None
    dtype = tensors[0].dtype
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or (grad and t.requires_grad):
            return None
    return ops if dtype in _EXT_DTYPES else None


def use_ext_isa(name: str | None) -> str | None:
    """Switch the C++ kernels to path ``name`` (``scalar``, ``avx2``, ...; None: what
    ``cpu_kernels`` chose), clamped to this CPU; returns the path now in use (None: off).
    For tests and benchmarks that compare the paths."""
    kernels = cpu_kernels()
    ops = kernels.ext_ops
    if ops is None:
        return None
    from model import cpu_ext

    wanted = kernels.ext if name is None else name
    got = int(ops.set_isa(cpu_ext.ISA[wanted]))
    return {v: k for k, v in cpu_ext.ISA.items()}[got]


def describe(device: torch.device | str = "cpu") -> str:
    """The kernel line for an engine on ``device`` (CPU choices, or the CUDA device's name)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        bf16 = "native" if torch.cuda.is_bf16_supported() else "emulated"
        return f"cuda kernels: {name} (sm_{major}{minor}), bf16 {bf16}; cpu prepack not used"
    return cpu_kernels().describe()


def log_choices(device: torch.device | str = "cpu") -> str:
    """Log the kernel line once per engine start and return it."""
    line = describe(device)
    log.info("%s", line)
    return line
