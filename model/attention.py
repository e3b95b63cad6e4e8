"""Attention: multi-head latent attention (MLA) and, for ``use_mla: false`` checkpoints
(DeepSeek-VL2-Tiny), plain multi-head attention; each the full causal pass and the
paged-cache step in one module. Below: MLA.

Without step metadata, ``forward`` is the full causal pass over [B, T] (training, tests):
keys and values are decompressed for every head through ``kv_b_proj``.

With a ``StepMetadata`` (the engine's step over packed tokens, ``model.step``), each token's
``cat(latent, k_pe)`` (r + dr values) is written into this layer's paged cache
(``kv_cache``, bound by ``DeepseekV2ForCausalLM.bind_kv_cache``) and
- decode rows (one token over a cached context) use the absorbed form: W_UK (the key half of
  ``kv_b_proj``) folded into the query and W_UV (its value half) into the output, so
  attention runs MQA-style over the cached vectors of each row's context blocks:

      q_latent = q_nope · W_UK                                # [B, H, r]
      scores   = (q_latent · latent_s + q_pe · k_pe_s) * softmax_scale + mask
      out      = o_proj((softmax(scores) @ latent) · W_UV)    # [B, D]

- prefill chunks decompress K/V of their sequence's cached context and run fused attention
  (earlier context unmasked + the chunk causally, merged by log-sum-exp), so memory per chunk
  stays linear in the context length.

The primitives (``project``, ``decompress``, ``absorb_query``, ``latent_to_output``) take the
packed token layout ([T, ...], no batch dim) but also accept extra leading dims; the
reference decode in ``model.decode`` is built from them alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import DeepseekV2Config
from model.linear import Linear, linear, prepack
from model.norm import RMSNorm
from model.packing import apply_packed_modules_mapping
from model.rope import RotaryEmbedding, apply_rotary, apply_rotary_halves, softmax_scale
from model.step import PrefillChunk, StepMetadata

RopeTables = Tensor  # rotations [T, dr/2] complex64 from RotaryEmbedding.lookup

# Fused CPU attention that also returns the log-sum-exp (public SDPA does not).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class DeepseekV2Attention(nn.Module):
    # q (or q_a) and kv_a read the same input: one matmul at inference (model.packing)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, ...]]] = {
        "_qkv_a": ("q_proj", "q_a_proj", "kv_a_proj_with_mqa")
    }

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

        # Set by pack_for_inference: the fused first projection [nq + r + dr, D] (and its
        # oneDNN pre-packed copy), the absorbed W_UK [H, dn, r] and W_UV^T [H, r, dv].
        self._qkv_a: Tensor | None = None
        self._qkv_a_packed: Tensor | None = None
        self._w_uk: Tensor | None = None
        self._w_uv_t: Tensor | None = None
        # W_UK per head transposed [H, r, dn]: rows the fused C++ decode (model.fused_decode)
        # multiplies a query by, as it does every weight
        self._w_uk_t: Tensor | None = None
        # this layer's paged latent cache [num_blocks, block_size, r + dr] (engine steps)
        self.kv_cache: Tensor | None = None

    # ---- inference layout ----------------------------------------------------------------
    @torch.no_grad()
    def pack_for_inference(self) -> None:
        """Fuse the first projections (``packed_modules_mapping``) and keep contiguous copies
        of the absorbed W_UK / W_UV (small: H * r * (dn + dv) values). Idempotent."""
        apply_packed_modules_mapping(self)
        if self._w_uk is None:
            w = self._w_kv_b().detach()  # [H, dn + dv, r]
            self._w_uk = w[:, : self.qk_nope_head_dim].contiguous()  # [H, dn, r]
            self._w_uv_t = w[:, self.qk_nope_head_dim :].transpose(1, 2).contiguous()  # [H, r, dv]
            self._w_uk_t = self._w_uk.transpose(1, 2).contiguous()  # [H, r, dn]

    def prepack_for_inference(self) -> None:
        """oneDNN pre-packed copies of what a decode step reads (model.linear.prepack)."""
        if self._qkv_a is not None:
            self._qkv_a_packed = prepack(self._qkv_a)
        else:
            (self.q_proj if self.q_lora_rank is None else self.q_a_proj).prepack_for_inference()
            self.kv_a_proj_with_mqa.prepack_for_inference()
        if self.q_lora_rank is not None:
            self.q_b_proj.prepack_for_inference()
        self.o_proj.prepack_for_inference()

    # ---- primitives ----------------------------------------------------------------------
    def project(
        self, x: Tensor, positions: Tensor, rope: RopeTables | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [T, D], positions [T] -> q_nope [T,H,dn], q_pe [T,H,dr] (roped),
        latent [T,r] (normed), k_pe [T,dr] (roped). ``rope`` = precomputed cos/sin for
        ``positions`` (``rotary.lookup(positions)``, computed once per step for all layers)."""
        if self._qkv_a is not None and not torch.is_grad_enabled():
            y = linear(x, self._qkv_a, packed=self._qkv_a_packed)  # [T, nq + r + dr]
            nq = y.shape[-1] - self.kv_lora_rank - self.qk_rope_head_dim
            q, kv = y[..., :nq], y[..., nq:]
        else:
            q = (self.q_proj if self.q_lora_rank is None else self.q_a_proj)(x)
            kv = self.kv_a_proj_with_mqa(x)  # [T, r + dr]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (self.num_heads, self.qk_head_dim))  # [T, H, dq]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
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

    def _absorbed(self) -> tuple[Tensor, Tensor]:
        """W_UK [H, dn, r] and W_UV^T [H, r, dv]: the packed copies, else views."""
        if self._w_uk is not None and self._w_uv_t is not None:
            return self._w_uk, self._w_uv_t
        w = self._w_kv_b()
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :].transpose(1, 2)

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

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RopeTables | None = None,
        step: StepMetadata | None = None,
    ) -> Tensor:
        """No step: x [B, T, D] (or [T, D]) -> [B, T, D], causal over T.
        With a step: x [T, D] packed tokens -> [T, D] over the paged cache (see the module
        docstring); decode rows first, then the prefill chunks in order."""
        q_nope, q_pe, latent, k_pe = self.project(x, positions, rope)
        if step is None:
            return self._causal(q_nope, q_pe, latent, k_pe)
        cache = self.kv_cache  # [num_blocks, block_size, r + dr]
        if cache is None:
            raise RuntimeError("no paged cache bound: call model.bind_kv_cache(cache) first")
        entry = torch.cat([latent, k_pe], dim=-1).to(cache.dtype)  # [T, r + dr]
        cache.view(-1, cache.shape[-1]).index_copy_(0, step.slot_mapping, entry)
        nd = step.num_decodes
        outs: list[Tensor] = []  # per part [rows, H, dv], concatenated for one o_proj
        if nd:
            outs.append(self._decode(q_nope[:nd], q_pe[:nd], cache, step))
        for chunk in step.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            outs.append(self._prefill(q_nope[rows], q_pe[rows], cache, chunk))
        return self.output(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _causal(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor, k_pe: Tensor) -> Tensor:
        """The full causal pass: [B, T, ...] (or [T, ...]) -> [B, T, D]."""
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

    def _decode(self, q_nope: Tensor, q_pe: Tensor, cache: Tensor, step: StepMetadata) -> Tensor:
        """Absorbed MLA, one new token per row: MQA over the row's cached context blocks,
        gathered whole (block-sized copies) and masked past each context -> [B, H, dv]."""
        b, width, r = q_nope.shape[0], cache.shape[-1], self.kv_lora_rank
        w_uk, w_uv_t = self._absorbed()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, B, r]
        q = torch.cat([q_latent.transpose(0, 1), q_pe], dim=-1)  # [B, H, r + dr]
        kv = cache.index_select(0, step.block_tables.reshape(-1)).view(b, -1, width)  # [B, L, r+dr]
        if step.decode_bias is None:
            scores = torch.bmm(q, kv.transpose(1, 2)).mul_(self.softmax_scale)  # [B, H, L]
        else:  # bias + scale * q.k in one op
            scores = torch.baddbmm(
                step.decode_bias, q, kv.transpose(1, 2), alpha=self.softmax_scale
            )
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype)
        o_latent = torch.bmm(probs, kv[:, :, :r])  # [B, H, r]
        return torch.bmm(o_latent.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, H, dv]

    def _prefill(self, q_nope: Tensor, q_pe: Tensor, cache: Tensor, chunk: PrefillChunk) -> Tensor:
        """Decompressed MLA for a chunk of n tokens over its sequence's whole context
        (the chunk included, already written) -> [n, H, dv]."""
        s, width = chunk.context_len, cache.shape[-1]
        kv = cache.index_select(0, chunk.blocks).view(-1, width)[:s]  # [S, r + dr]
        latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_nope, v = self.decompress(latent)  # [S, H, dn], [S, H, dv]
        heads, dr = k_nope.shape[1], self.qk_rope_head_dim
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, n, dq]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(s, heads, dr)], dim=-1).transpose(0, 1)
        return chunk_attention(q, k, v.transpose(0, 1), self.softmax_scale)  # [n, H, dv]


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention of a prefill chunk over its sequence's whole context, the chunk last:
    q [H, n, dq], k [H, S, dq], v [H, S, dv] (S >= n; query i sits at position S - n + i and
    sees keys 0..S - n + i) -> [n, H, dv]. Memory stays O(n) beyond the inputs on the CPU."""
    n, s, dq, dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    if dv != dq:
        # equal head dims keep SDPA on its fused (flash) CPU kernel: O(n) extra memory
        v = F.pad(v, (0, dq - dv))
    # 4-D inputs: 3-D ones fall off the fused (flash) CPU kernel onto the math path,
    # which materialises the [H, n, S] scores
    q, k, v = q[None], k[None], v[None]
    if s == n:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif _FLASH_CPU is not None and q.device.type == "cpu":
        # Keys before the chunk are all visible, the chunk's own are causal: two fused
        # calls merged by their log-sum-exp, so no [n, S] mask is ever built and extra
        # memory stays O(n) however long the context is.
        p = s - n
        o_prior, lse_prior = _FLASH_CPU(q, k[:, :, :p], v[:, :, :p], 0.0, False, scale=scale)[:2]
        o_own, lse_own = _FLASH_CPU(q, k[:, :, p:], v[:, :, p:], 0.0, True, scale=scale)[:2]
        lse = torch.logaddexp(lse_prior, lse_own)  # [1, H, n] float32
        o = o_prior * torch.exp(lse_prior - lse).unsqueeze(-1).to(o_prior.dtype)
        o = o + o_own * torch.exp(lse_own - lse).unsqueeze(-1).to(o_own.dtype)
    else:
        key_pos = torch.arange(s, device=q.device)
        mask = key_pos[None, :] <= torch.arange(s - n, s, device=q.device)[:, None]  # [n, S]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o[0, :, :, :dv].transpose(0, 1)  # [n, H, dv]


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention (``use_mla: false``, DeepSeek-VL2-Tiny's language model):
    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` as the published checkpoints name them (its
    reference code uses Llama's attention), heads of hidden_size // num_attention_heads,
    Llama-style (non-interleaved) RoPE over the whole head, key/value heads shared by groups
    of query heads when ``num_key_value_heads`` is smaller.

    With a ``StepMetadata``, each token's roped key and its value (``2 * Hkv * hd`` values, K
    first) go into this layer's paged cache; decode rows attend over their cached context
    blocks (masked past each context), prefill chunks over their sequence's cached context
    (``chunk_attention``), exactly as MLA does with its latent rows.
    """

    # q, k and v read the same input: one matmul at inference (model.packing)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, ...]]] = {
        "_qkv": ("q_proj", "k_proj", "v_proj")
    }

    def __init__(
        self,
        config: DeepseekV2Config,
        layer_idx: int = 0,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, h, hkv, hd, bias = (
            config.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            config.attention_bias,
        )
        self.q_proj = Linear(d, h * hd, bias=bias)
        self.k_proj = Linear(d, hkv * hd, bias=bias)
        self.v_proj = Linear(d, hkv * hd, bias=bias)
        self.o_proj = Linear(h * hd, d, bias=bias)
        self.rotary = rotary if rotary is not None else RotaryEmbedding(config)
        self.softmax_scale: float = softmax_scale(config)
        # set by pack_for_inference: q, k, v stacked [(H + 2 Hkv) * hd, D] (None with biases)
        self._qkv: Tensor | None = None
        self._qkv_packed: Tensor | None = None
        # this layer's paged cache [num_blocks, block_size, 2 * Hkv * hd] (engine steps)
        self.kv_cache: Tensor | None = None

    @torch.no_grad()
    def pack_for_inference(self) -> None:
        apply_packed_modules_mapping(self)

    def prepack_for_inference(self) -> None:
        if self._qkv is not None:
            self._qkv_packed = prepack(self._qkv)
        else:
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                proj.prepack_for_inference()
        self.o_proj.prepack_for_inference()

    def project(
        self, x: Tensor, positions: Tensor, rope: RopeTables | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [..., T, D] -> q [..., T, H, hd], k [..., T, Hkv, hd] (both roped), v [..., T, Hkv, hd]."""
        hd = self.head_dim
        if self._qkv is not None and not torch.is_grad_enabled():
            y = linear(x, self._qkv, packed=self._qkv_packed)
            q, k, v = y.split(
                [self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], -1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        rot = (rope if rope is not None else self.rotary.lookup(positions)).unsqueeze(-2)
        q = apply_rotary_halves(q.unflatten(-1, (self.num_heads, hd)), rot)
        k = apply_rotary_halves(k.unflatten(-1, (self.num_kv_heads, hd)), rot)
        return q, k, v.unflatten(-1, (self.num_kv_heads, hd))

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RopeTables | None = None,
        step: StepMetadata | None = None,
    ) -> Tensor:
        """As ``DeepseekV2Attention.forward``: x [B, T, D] causal without a step, packed
        [T, D] over the paged cache with one."""
        q, k, v = self.project(x, positions, rope)
        if step is None:
            return self._causal(q, k, v)
        cache = self.kv_cache  # [num_blocks, block_size, 2 * Hkv * hd]
        if cache is None:
            raise RuntimeError("no paged cache bound: call model.bind_kv_cache(cache) first")
        entry = torch.cat([k.flatten(-2), v.flatten(-2)], dim=-1).to(cache.dtype)  # [T, 2 Hkv hd]
        cache.view(-1, cache.shape[-1]).index_copy_(0, step.slot_mapping, entry)
        nd = step.num_decodes
        outs: list[Tensor] = []  # per part [rows, H, hd], concatenated for one o_proj
        if nd:
            outs.append(self._decode(q[:nd], cache, step))
        for chunk in step.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            outs.append(self._prefill(q[rows], cache, chunk))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_proj(o.flatten(-2))

    def _split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Cached rows [..., 2 * Hkv * hd] -> k, v [..., Hkv, hd]."""
        k, v = kv.chunk(2, dim=-1)
        return k.unflatten(-1, (self.num_kv_heads, -1)), v.unflatten(-1, (self.num_kv_heads, -1))

    def _expand_heads(self, t: Tensor, dim: int) -> Tensor:
        """Key/value heads repeated for their query-head group along ``dim`` (no copy if MHA)."""
        groups = self.num_heads // self.num_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=dim)

    def _causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """[B, T, H|Hkv, hd] (or [T, ...]) -> [B, T, D], causal over T."""
        k, v = self._expand_heads(k, -2), self._expand_heads(v, -2)
        o = F.scaled_dot_product_attention(
            q.transpose(-3, -2),  # [B, H, T, hd]
            k.transpose(-3, -2),
            v.transpose(-3, -2),
            is_causal=True,
            scale=self.softmax_scale,
        )
        return self.o_proj(o.transpose(-3, -2).flatten(-2))

    def _decode(self, q: Tensor, cache: Tensor, step: StepMetadata) -> Tensor:
        """One new token per row over the row's cached context blocks, gathered whole and
        masked past each context: q [B, H, hd] -> [B, H, hd]."""
        b, width = q.shape[0], cache.shape[-1]
        kv = cache.index_select(0, step.block_tables.reshape(-1)).view(b, -1, width)  # [B, L, w]
        k, v = self._split_kv(kv)  # [B, L, Hkv, hd]
        groups = self.num_heads // self.num_kv_heads
        qg = q.view(b, self.num_kv_heads, groups, self.head_dim)  # [B, Hkv, g, hd]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).mul_(self.softmax_scale)  # [B, Hkv, g, L]
        if step.decode_bias is not None:
            scores = scores + step.decode_bias[:, :, None, :]  # [B, 1, 1, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        o = torch.matmul(probs, v.transpose(1, 2))  # [B, Hkv, g, hd]
        return o.reshape(b, self.num_heads, self.head_dim)

    def _prefill(self, q: Tensor, cache: Tensor, chunk: PrefillChunk) -> Tensor:
        """A chunk of n tokens over its sequence's whole context (the chunk included, already
        written): q [n, H, hd] -> [n, H, hd]."""
        s, width = chunk.context_len, cache.shape[-1]
        kv = cache.index_select(0, chunk.blocks).view(-1, width)[:s]  # [S, 2 Hkv hd]
        k, v = self._split_kv(kv)  # [S, Hkv, hd]
        k, v = self._expand_heads(k, 1), self._expand_heads(v, 1)  # [S, H, hd]
        return chunk_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.softmax_scale
        )


Attention = DeepseekV2Attention | MultiHeadAttention


def make_attention(
    config: DeepseekV2Config, layer_idx: int = 0, rotary: RotaryEmbedding | None = None
) -> Attention:
    """The attention kind the config names: MLA, or plain MHA under ``use_mla: false``."""
    cls = DeepseekV2Attention if config.use_mla else MultiHeadAttention
    return cls(config, layer_idx, rotary)
