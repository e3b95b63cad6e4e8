"""Multi-head latent attention (MLA), with the primitives both attention paths are built from.

Prefill (``forward``) decompresses keys and values for every head through ``kv_b_proj``.
Decode absorbs W_UK (the key half of ``kv_b_proj``) into the query and W_UV (its value half)
into the output, so attention runs MQA-style over the cached ``cat(latent, k_pe)`` vectors:

    q_latent = absorb_query(q_nope)                       # [T, H, r]
    scores   = (q_latent · latent_s + q_pe · k_pe_s) * softmax_scale
    out      = latent_to_output(softmax(scores) @ latent) # [T, D]

The primitives take the packed token layout ([T, ...], no batch dim) but also accept extra
leading dims, which ``forward`` uses for [B, T, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import DeepseekV2Config
from model.linear import Linear
from model.norm import RMSNorm
from model.rope import RotaryEmbedding, apply_rotary, softmax_scale

RopeTables = Tensor  # rotations [T, dr/2] complex64 from RotaryEmbedding.lookup


class DeepseekV2Attention(nn.Module):
    def __init__(
        self,
        config: DeepseekV2Config,
        layer_idx: int = 0,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        d, h, bias = config.hidden_size, self.num_heads, config.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = Linear(h * self.v_head_dim, d, bias=bias)

        self.rotary = rotary if rotary is not None else RotaryEmbedding(config)
        self.softmax_scale: float = softmax_scale(config)

    # ---- primitives ----------------------------------------------------------------------
    def project(
        self, x: Tensor, positions: Tensor, rope: RopeTables | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [T, D], positions [T] -> q_nope [T,H,dn], q_pe [T,H,dr] (roped),
        latent [T,r] (normed), k_pe [T,dr] (roped). ``rope`` = precomputed cos/sin for
        ``positions`` (``rotary.lookup(positions)``, computed once per step for all layers)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.num_heads, self.qk_head_dim))  # [T, H, dq]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)  # [T, r + dr]
        latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # only the latent part is normed
        rot = rope if rope is not None else self.rotary.lookup(positions)  # [T, dr/2]
        q_pe = apply_rotary(q_pe, rot.unsqueeze(-2))  # [T, H, dr]
        k_pe = apply_rotary(k_pe, rot)  # [T, dr], one head shared by all
        return q_nope, q_pe, latent, k_pe

    def decompress(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """latent [S, r] -> k_nope [S, H, dn], v [S, H, dv]."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, -1))  # [S, H, dn + dv]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return k_nope, v

    def _w_kv_b(self) -> Tensor:
        return self.kv_b_proj.weight.view(
            self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )  # [H, dn + dv, r]

    def absorb_query(self, q_nope: Tensor) -> Tensor:
        """q_nope [T, H, dn] -> q_latent [T, H, r] = q_nope · W_UK per head."""
        w_uk = self._w_kv_b()[:, : self.qk_nope_head_dim]  # [H, dn, r]
        q = q_nope.transpose(-3, -2)  # [H, T, dn]
        return torch.matmul(q, w_uk).transpose(-3, -2)  # [T, H, r]

    def latent_to_output(self, o_latent: Tensor) -> Tensor:
        """o_latent [T, H, r] (attention-weighted latents) -> [T, D]: W_UV per head, then o_proj."""
        w_uv = self._w_kv_b()[:, self.qk_nope_head_dim :]  # [H, dv, r]
        o = torch.matmul(o_latent.transpose(-3, -2), w_uv.transpose(-1, -2))  # [H, T, dv]
        return self.output(o.transpose(-3, -2))

    def output(self, o: Tensor) -> Tensor:
        """o [T, H, dv] -> [T, D] (o_proj only)."""
        return self.o_proj(o.flatten(-2))

    # ---- full causal pass (prefill / training) ------------------------------------------
    def forward(self, x: Tensor, positions: Tensor, rope: RopeTables | None = None) -> Tensor:
        """x [B, T, D] (or [T, D]) -> [B, T, D], causal over T."""
        q_nope, q_pe, latent, k_pe = self.project(x, positions, rope)
        k_nope, v = self.decompress(latent)  # [B, T, H, dn], [B, T, H, dv]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, T, H, dq]
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand_as(q_pe)], dim=-1)
        dq, dv = q.shape[-1], v.shape[-1]
        if dv < dq:
            # Equal head dims keep SDPA on its fused CPU kernel (memory linear in T); the
            # zero columns add nothing to the output and are sliced off.
            v = F.pad(v, (0, dq - dv))
        o = F.scaled_dot_product_attention(
            q.transpose(-3, -2),  # [B, H, T, dq]
            k.transpose(-3, -2),
            v.transpose(-3, -2),  # [B, H, T, dq]
            is_causal=True,
            scale=self.softmax_scale,
        )
        return self.output(o[..., :dv].transpose(-3, -2))  # [B, T, D]
