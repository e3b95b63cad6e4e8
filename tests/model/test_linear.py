"""model.linear: the few-row forms (half precision; one float32 row) give F.linear's result in
F.linear's shape, and everything else (float32 batches, training, half-precision weights
stored transposed) is F.linear itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.kernels import cpu_kernels
from model.linear import EXT_MAX_ROWS, WEIGHT_LEFT_MAX_ROWS, Linear, linear, prepack

# oneDNN pre-packs bf16 only with avx512bw/vl/dq or avx_ne_convert (model.kernels decides)
needs_bf16_prepack = pytest.mark.skipif(
    not cpu_kernels().can_prepack(torch.bfloat16),
    reason=f"this CPU cannot pre-pack bf16: {cpu_kernels().why_not.get(torch.bfloat16)}",
)


def _operands(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 64, generator=g).to(dtype)
    w = (torch.randn(48, 64, generator=g) / 8).to(dtype)
    return x, w


@pytest.mark.parametrize(
    "shape",
    [(1,), (1, 1), (2,), (WEIGHT_LEFT_MAX_ROWS,), (2, 3), (WEIGHT_LEFT_MAX_ROWS + 1,), (40,)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_match_f_linear(shape, dtype):
    x, w = _operands(shape, dtype)
    bias = torch.linspace(-1, 1, 48).to(dtype)
    with torch.inference_mode():
        ours, ref = linear(x, w, bias), F.linear(x, w, bias)
    assert ours.shape == ref.shape == (*shape, 48)
    assert ours.dtype == dtype
    # same float32 sums in another order, rounded once to the half type
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)
    # callers view the last dim as (re, im) pairs: it must have stride 1
    torch.view_as_complex(ours.float().unflatten(-1, (-1, 2)))


def test_float32_batches_beyond_the_few_row_kernels_are_f_linear_exactly():
    x, w = _operands((EXT_MAX_ROWS[torch.float32] + 1,), torch.float32)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("column_major", [False, True])
def test_float32_one_row_matches_f_linear(column_major):
    # the engine stores float32 weights transposed; one row goes through torch.mv either way
    x, w = _operands((1,), torch.float32)
    if column_major:
        w = w.t().contiguous().t()
    bias = torch.linspace(-1, 1, 48)
    with torch.inference_mode():
        ours, ref = linear(x, w, bias), F.linear(x, w, bias)
    assert ours.shape == ref.shape == (1, 48)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_transposed_storage_takes_f_linear():
    # float32 inference stores weights column-major; a half-precision weight stored that
    # way must not reach torch.mv / the weight-left product (slow on that layout)
    x, w = _operands((1,), torch.bfloat16)
    w_col = w.t().contiguous().t()
    with torch.inference_mode():
        assert torch.equal(linear(x, w_col), F.linear(x, w_col))


def test_training_keeps_f_linear_and_its_gradients():
    layer = Linear(64, 48).to(torch.bfloat16)
    x, _ = _operands((1,), torch.bfloat16)
    x.requires_grad_(True)
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
    # the same call F.linear makes, so the same bits in training
    assert torch.equal(layer(x), expected)


def test_linear_module_keeps_nn_linear_state_dict():
    layer = Linear(64, 48, bias=False)
    assert list(layer.state_dict()) == ["weight"]
    assert isinstance(layer, torch.nn.Linear)


@needs_bf16_prepack
@pytest.mark.parametrize("shape", [(2,), (17,), (2, 20)], ids=lambda s: "x".join(map(str, s)))
def test_prepacked_weight_matches_f_linear(shape):
    x, w = _operands(shape, torch.bfloat16)
    bias = torch.linspace(-1, 1, 48).to(torch.bfloat16)
    packed = prepack(w)
    assert packed is not None
    with torch.inference_mode():
        ours, ref = linear(x, w, bias, packed), F.linear(x, w, bias)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_prepack_skips_float32():
    assert prepack(torch.randn(48, 64)) is None  # float32: F.linear is already direct
    layer = Linear(64, 48)
    layer.prepack_for_inference()
    assert layer.packed is None


@needs_bf16_prepack
def test_prepack_applies_to_half_precision():
    layer = Linear(64, 48).to(torch.bfloat16)
    layer.prepack_for_inference()
    assert layer.packed is not None


def test_prepack_follows_the_kernel_choice(monkeypatch):
    # a CPU where oneDNN cannot pre-pack (AVX2 only): no packed copy, F.linear's result
    monkeypatch.setitem(cpu_kernels().prepack, torch.bfloat16, False)
    layer = Linear(64, 48).to(torch.bfloat16)
    layer.prepack_for_inference()
    assert layer.packed is None
    x, _ = _operands((20,), torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
