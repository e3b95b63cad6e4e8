"""model.cpu_ext: the C++ few-row linear and fused routed experts equal torch's results on
every vector path this CPU can run (odd shapes: tails of every width), the path follows
DSV2_CPU_ISA, and a missing compiler or a failed build leaves torch's kernels in place
instead of failing start-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import cpu_ext
from model.kernels import cpu_kernels, use_ext_isa
from model.moe import RoutedExperts

ROOT = Path(__file__).resolve().parents[2]
OPS = cpu_ext.load()
needs_ext = pytest.mark.skipif(
    OPS is None, reason=f"C++ kernels not built: {cpu_ext.why_unavailable()}"
)
PATHS = list(cpu_ext.ISA)  # scalar, avx2, avx512, avx512_bf16


@pytest.fixture(params=PATHS)
def path(request):
    """Each C++ path in turn; paths this CPU lacks skip with the reason."""
    if OPS is None:
        pytest.skip(f"C++ kernels not built: {cpu_ext.why_unavailable()}")
    wanted = cpu_ext.ISA[request.param]
    if wanted > int(OPS.cpu_max_isa()):
        pytest.skip(f"this CPU has no {request.param} (best: isa {int(OPS.cpu_max_isa())})")
    assert use_ext_isa(request.param) == request.param
    yield request.param
    use_ext_isa(None)  # back to what cpu_kernels chose


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: 1e-5 relative to the result's scale; bfloat16: the result rounded once to
    bf16 (2^-8 relative) plus products summed in another order."""
    scale = want.abs().max().item() + 1e-30
    err = (got.float() - want.float()).abs().max().item() / scale
    limit = 1e-5 if dtype == torch.float32 else 2**-7
    assert err <= limit, f"max error {err:.2e} of the result's scale (allowed {limit:.0e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "m,n,k", [(1, 1, 1), (1, 7, 15), (2, 33, 17), (3, 5, 100), (5, 67, 31), (8, 130, 513)]
)
def test_linear_equals_torch(path, dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    got = OPS.linear(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    _close(got, F.linear(x.double(), w.double()), dtype)


@needs_ext
def test_linear_reads_a_row_major_view_with_its_row_stride():
    # a fused matrix's member is a view with a longer row stride than its width
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(40, 24, generator=g)
    w = fused[:, :19]
    x = torch.randn(3, 19, generator=g)
    _close(OPS.linear(x, w), F.linear(x.double(), w.double()), torch.float32)


@needs_ext
def test_linear_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="row-major"):
        OPS.linear(torch.randn(2, 8), torch.randn(8, 6).t())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS.linear(torch.randn(2, 8).half(), torch.randn(6, 8).half())


def _experts(start: int, end: int, d: int, inter: int, dtype: torch.dtype) -> RoutedExperts:
    g = torch.Generator().manual_seed(start * 100 + end)
    ex = RoutedExperts(d, inter, start, end)
    with torch.no_grad():
        ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=g) / d**0.5)
        ex.down.copy_(torch.randn(ex.down.shape, generator=g) / inter**0.5)
    return ex.to(dtype).requires_grad_(False)


def _definition(ex: RoutedExperts, hidden, ids, weights) -> torch.Tensor:
    """The routed experts' sum straight from the definition, in float64."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    inter = ex.intermediate_size
    for r in range(hidden.shape[0]):
        for e, w in zip(ids[r].tolist(), weights[r].tolist(), strict=True):
            if not ex.start <= e < ex.end:
                continue
            gu = ex.gate_up[e - ex.start].double() @ hidden[r].double()
            h = F.silu(gu[:inter]) * gu[inter:]
            out[r] += w * (ex.down[e - ex.start].double() @ h)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "rows,slice_,d,inter",
    [(1, (0, 8), 32, 16), (3, (2, 7), 17, 9), (7, (0, 8), 40, 24), (16, (3, 8), 33, 20)],
)
def test_fused_experts_equal_the_definition_and_torchs_path(
    path, dtype, rows, slice_, d, inter, monkeypatch
):
    ex = _experts(*slice_, d, inter, dtype)
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(rows)])  # [N, 3]
    weights = torch.rand(rows, 3, generator=g)
    with torch.inference_mode():
        got = OPS.moe(hidden, ids, weights, ex.gate_up, ex.down, ex.start)
    assert got.shape == hidden.shape and got.dtype == dtype
    _close(got, _definition(ex, hidden, ids, weights), dtype)
    if dtype == torch.bfloat16 and d % 8 == 0 and inter % 8 == 0:
        # rounded where torch's bf16 ops round: close to torch's own path too (whose grouped
        # kernel needs 16-byte strides, hence the shapes)
        monkeypatch.setattr("model.moe.EXT_MAX_ROWS_PER_EXPERT", {})
        with torch.inference_mode():
            _close(got, ex(hidden, ids, weights), dtype)


@needs_ext
def test_fused_experts_with_no_row_of_this_slice_are_zero():
    ex = _experts(4, 8, 16, 8, torch.float32)
    ids = torch.tensor([[0, 1], [2, 3]])
    got = OPS.moe(torch.randn(2, 16), ids, torch.ones(2, 2), ex.gate_up, ex.down, ex.start)
    assert torch.equal(got, torch.zeros(2, 16))


@needs_ext
def test_routed_experts_take_the_fused_kernel_for_decode_batches(monkeypatch):
    ex = _experts(0, 8, 16, 8, torch.float32)
    calls = []
    real = OPS.moe

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cpu_kernels().ext_ops, "moe", spy)
    hidden = torch.randn(2, 16)
    with torch.inference_mode():
        got = ex(hidden, torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))
        ex.sync_free = True  # torch's path
        want = ex(hidden, torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))
    assert calls == [(2, 16)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _python(code: str, **env: str) -> str:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("DSV2_")}
    child_env.update(env, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


CHOICE = """
import torch
from model.kernels import cpu_kernels
from model.linear import linear
k = cpu_kernels()
print(k.describe())
x, w = torch.randn(2, 64), torch.randn(48, 64)
with torch.inference_mode():
    torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))
print("ext", k.ext)
"""


@needs_ext
@pytest.mark.parametrize("cap", ["avx2", "avx512"])
def test_the_cap_picks_the_path_of_its_level(cap):
    if cpu_ext.ISA[cap] > int(OPS.cpu_max_isa()):
        pytest.skip(f"this CPU has no {cap}")
    out = _python(CHOICE, DSV2_CPU_ISA=cap)
    assert f"fused experts on ({cap})" in out and f"ext {cap}" in out


@needs_ext
def test_turned_off_by_the_environment_keeps_torchs_kernels():
    out = _python(CHOICE, DSV2_CPU_EXT="0")
    assert "fused experts off (turned off by DSV2_CPU_EXT)" in out and "ext None" in out


def test_a_missing_compiler_is_a_reason_not_an_error(tmp_path):
    out = _python(CHOICE, CXX=str(tmp_path / "no-such-g++"), DSV2_CPU_EXT_DIR=str(tmp_path))
    assert "fused experts off (" in out and "no-such-g++ not found" in out and "ext None" in out


@needs_ext
def test_a_prebuilt_library_of_these_sources_loads_without_a_compiler(tmp_path):
    """What the container image relies on: its runtime stage has no compiler, only the
    library its builder stage built; a library of other sources is not loaded there."""
    for name in (f"{cpu_ext.NAME}.so", cpu_ext.DIGEST_FILE):
        shutil.copy(cpu_ext.build_dir() / name, tmp_path / name)
    no_compiler = {"CXX": str(tmp_path / "no-such-g++"), "DSV2_CPU_EXT_DIR": str(tmp_path)}
    out = _python(CHOICE, **no_compiler)
    assert "fused experts on (" in out and "ext None" not in out

    (tmp_path / cpu_ext.DIGEST_FILE).write_text("0" * 64 + "\n")  # built from other sources
    out = _python(CHOICE, **no_compiler)
    assert "no-such-g++ not found" in out and "ext None" in out


def test_a_failed_build_is_a_reason_not_an_error(tmp_path):
    broken = tmp_path / "dsv2_cpu.cpp"
    broken.write_text("this is not C++;\n")
    code = f"""
from pathlib import Path
from model import cpu_ext
cpu_ext.SOURCES = [Path({str(broken)!r})]
print("ops", cpu_ext.load())
print("why", cpu_ext.why_unavailable())
"""
    out = _python(code, DSV2_CPU_EXT_DIR=str(tmp_path / "build"))
    assert "ops None" in out and "why build failed:" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_equals_the_module_formula(dtype):
    if OPS is None:
        pytest.skip(f"C++ kernels not built: {cpu_ext.why_unavailable()}")
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 70, generator=g).to(dtype)
    x = rows[:, :67]  # a view with a longer row stride, like the latent part of kv
    w = (1 + torch.randn(67, generator=g) / 4).to(dtype)
    got = OPS.rms_norm(x, w, 1e-6)
    normed = F.rms_norm(x.float(), (67,), eps=1e-6)  # model.norm.RMSNorm's own formula
    want = normed * w.float() if dtype == torch.float32 else w * normed.to(dtype)
    assert got.dtype == dtype and got.is_contiguous()
    _close(got, want, dtype)
    if dtype == torch.bfloat16:  # the same roundings: at most one bf16 step apart anywhere
        assert ((got.float() - want.float()).abs() <= want.float().abs() / 128 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [None, 3])
def test_rotary_equals_the_complex_product(dtype, heads):
    if OPS is None:
        pytest.skip(f"C++ kernels not built: {cpu_ext.why_unavailable()}")
    from model.rope import apply_rotary

    g = torch.Generator().manual_seed(4)
    t, dim = 6, 10
    shape = (t, dim) if heads is None else (t, heads, dim + 4)
    x = torch.randn(shape, generator=g).to(dtype)[..., :dim]  # a split view, as in attention
    angles = torch.randn(t, dim // 2, generator=g)
    rot = torch.polar(torch.full_like(angles, 0.9), angles)  # [T, dim/2] complex64
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    r = rot if heads is None else rot.unsqueeze(1)
    want = torch.view_as_real(xc * r).flatten(-2).to(dtype)
    got = apply_rotary(x, r)  # takes the C++ op on this shape
    assert got.shape == want.shape and got.dtype == dtype
    _close(got, want, dtype)


def test_rotary_of_a_batch_whose_size_equals_its_length_broadcasts_like_torch():
    """x [B, T, dim] with rotations [T, dim/2] (a full causal pass) rotates every batch row by
    the positions' angles. With B == T the sizes alone look like the C++ op's [T, H, dim]
    layout; taking it there rotated row b by position b's angle (the shipped demo model lost
    13 points of held-out accuracy to it)."""
    from model.rope import apply_rotary

    g = torch.Generator().manual_seed(5)
    n, dim = 7, 8
    x = torch.randn(n, n, dim, generator=g)  # [B, T, dim], B == T
    rot = torch.polar(torch.ones(n, dim // 2), torch.randn(n, dim // 2, generator=g))  # [T, dim/2]
    want = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    torch.testing.assert_close(apply_rotary(x, rot), want, rtol=1e-6, atol=1e-6)


def test_kernels_run_on_torchs_threads():
    """at::parallel_for in the library is OpenMP compiled in: with 2 torch threads a
    parallel region runs on 2 (built without -fopenmp, every kernel ran on one)."""
    if OPS is None:
        pytest.skip(f"C++ kernels not built: {cpu_ext.why_unavailable()}")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert OPS.parallel_threads() == 2
        torch.set_num_threads(1)
        assert OPS.parallel_threads() == 1
    finally:
        torch.set_num_threads(before)
