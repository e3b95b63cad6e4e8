"""Rotary position embedding on adjacent pairs, with DeepSeek's YaRN extension.

DeepSeek-V2's MLA rotates dims (0,1), (2,3), ... together (interleaved, ``apply_rotary``), not
the two halves of the head as NeoX/Llama-style code does; plain multi-head attention
(``use_mla: false``, DeepSeek-VL2-Tiny) rotates halves (``apply_rotary_halves``). Both read the
same table of rotations. YaRN blends interpolated and extrapolated frequencies over a
ramp of dims and scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
(1.0 for the published configs); the attention softmax scale separately gets mscale_all_dim²
(see ``softmax_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.config import DeepseekV2Config
from model.kernels import ext_for


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: DeepseekV2Config) -> float:
    """1/sqrt(qk_head_dim) (the MHA head under ``use_mla: false``), times
    mscale(factor, mscale_all_dim)² under YaRN."""
    scale = config.qk_head_dim**-0.5
    if config.rope_type == "yarn":
        mscale_all_dim = config.rope_scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = yarn_get_mscale(float(config.rope_scaling["factor"]), float(mscale_all_dim))
            scale = scale * m * m
    return scale


def _yarn_inv_freq(config: DeepseekV2Config, dim: int, base: float) -> tuple[Tensor, float]:
    rs = config.rope_scaling
    factor = float(rs["factor"])
    original_max = int(rs.get("original_max_position_embeddings") or config.max_position_embeddings)
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)
    mscale = float(rs.get("mscale") or 1)
    mscale_all_dim = float(rs.get("mscale_all_dim") or 0)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # device="cpu" explicitly: models are built under torch.device("meta") when loading.
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    extrapolation_mask = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    freq_extra = 1.0 / pos_freqs
    freq_inter = 1.0 / (factor * pos_freqs)
    inv_freq = freq_inter * (1 - extrapolation_mask) + freq_extra * extrapolation_mask
    attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return inv_freq, attention_factor


class RotaryEmbedding:
    """cos/sin lookup by absolute position; one instance is shared by all layers of a model.

    Not an nn.Module on purpose: it holds no weights, tables are built lazily on the device of
    the positions, so models built on the meta device and loaded later need no fix-up.
    """

    def __init__(self, config: DeepseekV2Config) -> None:
        self.dim = config.rope_dim
        base = float(config.rope_theta)
        if config.rope_type == "yarn":
            self.inv_freq, self.attention_factor = _yarn_inv_freq(config, self.dim, base)
        else:
            self.inv_freq = 1.0 / (
                base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu") / self.dim)
            )
            self.attention_factor = 1.0
        self._table: Tensor | None = None  # [P, dim/2] complex64: (cos + i sin) * factor

    def _grow(self, needed: int, device: torch.device) -> None:
        size = max(256, 1 << max(needed - 1, 1).bit_length())
        t = torch.arange(size, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [P, dim/2]
        self._table = torch.polar(torch.full_like(freqs, self.attention_factor), freqs)

    def lookup(self, positions: Tensor, max_position: int | None = None) -> Tensor:
        """positions [*] int -> rotations [*, dim/2] complex64, for ``apply_rotary``.
        ``max_position``: the largest of ``positions`` when the caller knows it (no device
        sync: CUDA graphs cannot capture one); otherwise it is read from the tensor."""
        # Grow only when a position is past the table.
        table = self._table
        if table is None or table.device != positions.device:
            table = None
        if table is None or max_position is None or max_position >= table.shape[0]:
            top = max_position
            if top is None:  # one host sync
                top = int(positions.max()) if positions.numel() else 0
            if table is None or top >= table.shape[0]:
                self._grow(top + 1, positions.device)
                table = self._table
        return table[positions]

    def reserve(self, max_positions: int, device: torch.device) -> None:
        """Build the table for positions [0, max_positions) on ``device`` now (before a
        CUDA graph captures lookups, which must not grow it)."""
        table = self._table
        if table is None or table.device != device or table.shape[0] < max_positions:
            self._grow(max_positions, device)

    # Older name, kept for callers that precompute ``rope`` for ``project``: the result is
    # opaque to them, only passed back in.
    cos_sin = lookup


def apply_rotary(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim by ``rotations`` (complex,
    broadcastable to x's shape with the last dim halved). Computed in float32 and cast back,
    like the reference."""
    # the attention's shapes, [T, H, dim] with rotations [T, 1, dim/2] or [T, dim] with
    # [T, dim/2]: one C++ call, the same float32 arithmetic (model.cpu_ext)
    # Only those two layouts: rotations of another rank broadcast differently (a [B, T, dim]
    # x with [T, dim/2] rotations rotates every batch row alike, whatever B and T are).
    ext = ext_for(x) if rotations.dtype == torch.complex64 else None
    if (
        ext is not None
        and x.dim() in (2, 3)
        and rotations.dim() == x.dim()
        and x.stride(-1) == 1
        and rotations.shape[0] == x.shape[0]
        and rotations.shape[-1] * 2 == x.shape[-1]
        and rotations.numel() * 2 == x.shape[0] * x.shape[-1]
    ):
        rot = rotations.reshape(x.shape[0], -1).contiguous()  # [T, dim/2]
        y = ext.rotary(x if x.dim() == 3 else x.unsqueeze(1), rot)
        return y if x.dim() == 3 else y.squeeze(1)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [..., dim/2]
    return torch.view_as_real(xc * rotations).flatten(-2).to(x.dtype)


def apply_rotary_halves(x: Tensor, rotations: Tensor) -> Tensor:
    """Llama/NeoX-style RoPE: rotate pairs (x[i], x[i + dim/2]) of the last dim by
    ``rotations`` (as for ``apply_rotary``). Computed in float32 and cast back."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [..., dim/2] each
    xc = torch.complex(x1, x2) * rotations
    return torch.cat([xc.real, xc.imag], dim=-1).to(x.dtype)
