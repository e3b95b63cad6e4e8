"""Inference weight layouts, applied once after loading, from one mapping table per module.

Modules keep the published parameter names (checkpoints and training use them); for
inference some weights are fused so one matmul replaces several. A module class declares
what it fuses, the way vLLM's ``packed_modules_mapping`` does:

    packed_modules_mapping = {"_qkv_a": ("q_proj", "q_a_proj", "kv_a_proj_with_mqa")}

meaning: the attribute ``_qkv_a`` holds the rows of those ``Linear`` members (the ones the
module has, in that order) stacked into one ``[sum(out), in]`` matrix, and each member's weight
becomes a view of it. Values never change, no weight is held twice, and the published modules
keep working (a full causal pass reads them as before).

Also here: float32 weights are stored transposed (``[in, out]`` contiguous, same shape and
values; ``F.linear`` then hands BLAS a row-major operand, about twice as fast for the few
rows of a decode step), half-precision ones stay row-major (their one-row kernels are faster
so; see ``model.moe.transpose_for_inference``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from model.kernels import cpu_kernels


def transpose_for_inference(dtype: torch.dtype) -> bool:
    """Whether inference stores weights transposed ([in, out] contiguous): float32 GEMMs with
    few rows run about twice as fast that way on CPU with torch's kernels; bf16/fp16 ones run
    faster row-major, and so does everything where this project's C++ kernels do the
    few-row products (``model.cpu_ext``: they stream row-major weights)."""
    return dtype == torch.float32 and cpu_kernels().ext_ops is None


def inference_layout(w: Tensor) -> Tensor:
    """``w`` [out, in] in the storage inference reads fastest (same shape and values)."""
    # stride(0) == 1: already column-major, possibly rows of a fused matrix (kept a view)
    if transpose_for_inference(w.dtype) and w.dim() == 2 and w.stride(0) != 1:
        return w.t().contiguous().t()
    return w


def fuse_rows(owner: nn.Module, members: Iterable[str]) -> Tensor | None:
    """Stack the weights of ``owner``'s Linear ``members`` (the ones it has) into one
    [sum(out), in] matrix and make each member's weight a view of it. None (nothing fused)
    when fewer than two members exist or one has a bias (a fused bias is not worth it here)."""
    mods = [m for m in (getattr(owner, n, None) for n in members) if isinstance(m, nn.Linear)]
    if len(mods) < 2 or any(m.bias is not None for m in mods):
        return None
    fused = inference_layout(torch.cat([m.weight.detach() for m in mods]))  # [sum(out), in]
    begin = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[begin : begin + n], requires_grad=False)
        begin += n
    return fused


def apply_packed_modules_mapping(module: nn.Module) -> None:
    """Fuse what ``module.packed_modules_mapping`` lists (idempotent: a fused attribute that
    is already set is kept)."""
    for fused_name, members in getattr(module, "packed_modules_mapping", {}).items():
        if getattr(module, fused_name, None) is None:
            setattr(module, fused_name, fuse_rows(module, members))


def transpose_linears(model: nn.Module, keep: Iterable[nn.Module] = ()) -> None:
    """Store every Linear weight of ``model`` in ``inference_layout`` except the modules in
    ``keep`` (a tied lm_head keeps the embedding's row-major layout for row lookups)."""
    skip = {id(m) for m in keep}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod) not in skip:
            w = inference_layout(mod.weight.detach())
            if w.data_ptr() != mod.weight.data_ptr():
                mod.weight = nn.Parameter(w, requires_grad=False)
