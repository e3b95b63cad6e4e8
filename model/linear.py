"""Linear layers with faster paths for the few-row products of decoding (mostly half precision).

A decode step multiplies a handful of rows by every weight matrix once, so its cost is
reading the weights. On CPU, ``F.linear`` in bfloat16/float16 hands those few rows to a GEMM
that re-lays out the whole weight on each call; measured at DeepSeek-V2 shapes (one core):
- one row: ``torch.mv`` reads the row-major weight directly, 1.3-2.8x faster (lm_head of a
  32K vocabulary: 4.2 ms instead of 6.2 ms);
- 2-16 rows: the weight as the left operand, ``(W @ x^T)^T``, 25-40% faster;
- more rows: ``F.linear`` is as fast or faster.
In float32 only the one-row ``torch.mv`` helps (MKL's GEMV on the transposed storage the
engine keeps, 5-10% faster than ``F.linear``); more rows stay ``F.linear``.
With 2+ rows, a weight pre-packed once into oneDNN's blocked layout (``prepack``) skips that
re-layout altogether: 1.3-2.6x faster at 32 rows (lm_head 3.4 ms instead of 5.6-9.2 ms). It
is a second copy of the weight, so inference code opts in per layer, and only where
``model.kernels`` found oneDNN able to do it on this CPU (AVX2-only CPUs cannot).
Where this project's C++ kernels are built (``model.cpu_ext``, chosen in ``model.kernels``),
products of up to ``EXT_MAX_ROWS`` rows with a row-major float32 or bfloat16 weight run there
instead: each thread streams its share of the weight once for all rows, bf16 widened in
registers (1 row bf16: 2-4x faster than ``torch.mv``; float32 ties MKL's GEMV at 1 row and
is faster at 2-8). Float32 weights then stay row-major (``model.packing``).
Values are the same products summed in another order (float32 accumulation either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.kernels import cpu_kernels

_HALF = (torch.bfloat16, torch.float16)
# up to this many rows the weight goes on the left (see the module docstring)
WEIGHT_LEFT_MAX_ROWS = 16
# the batch size oneDNN lays a pre-packed weight out for (a decode step of many sequences)
PREPACK_ROWS_HINT = 32
# up to this many rows the C++ kernels multiply (beyond, oneDNN/MKL GEMMs, AMX in bf16, win)
EXT_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4}


def prepack(weight: Tensor) -> Tensor | None:
    """oneDNN's pre-packed copy of a half-precision CPU weight [out, in] for ``linear``'s
    ``packed``; None where that does not apply (other dtypes or devices, or a CPU where
    oneDNN cannot pre-pack this dtype: see ``model.kernels``)."""
    if weight.dtype not in _HALF or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not cpu_kernels().can_prepack(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREPACK_ROWS_HINT)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: Tensor | None = None
) -> Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] -> [..., out].
    ``packed``: ``prepack(weight)``, used for products of 2+ rows outside autograd."""
    if x.device.type != "cpu" or (
        torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    ):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    ext = cpu_kernels().ext_ops
    if (
        ext is not None
        and rows <= EXT_MAX_ROWS.get(weight.dtype, 0)
        and x.dtype == weight.dtype
        and weight.stride(-1) == 1
        and not torch.compiler.is_compiling()
    ):
        if x.dim() == 2:
            y = ext.linear(x, weight)  # [rows, out]
        else:
            y = ext.linear(x.reshape(rows, -1), weight).view(*x.shape[:-1], -1)  # [..., out]
        return y if bias is None else y + bias
    half = weight.dtype in _HALF
    if half and not cpu_kernels().half_few_rows:
        return F.linear(x, weight, bias)
    row_major = weight.stride(-1) == 1  # the layout the half-precision fast forms read well
    if rows == 1 and (row_major or not half):
        # float32 too: MKL's GEMV reads the transposed storage 5-10% faster than F.linear
        y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], -1)  # [..., out]
        return y if bias is None else y + bias
    if not (half and row_major) or (packed is None and rows > WEIGHT_LEFT_MAX_ROWS):
        return F.linear(x, weight, bias)
    if packed is not None:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], -1)
    # 2-16 rows, weight on the left: [out, rows] -> a contiguous [rows, out] (callers view
    # the last dim as pairs)
    y = torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by ``linear`` above."""

    packed: Tensor | None = None  # set by prepack_for_inference

    def prepack_for_inference(self) -> None:
        """Keep a pre-packed copy of the weight (see ``prepack``; a no-op where it does not
        apply). The copy does not follow later changes to ``weight``: call this last."""
        self.packed = prepack(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)
