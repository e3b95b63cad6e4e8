"""One forward step over the packed tokens of every scheduled sequence.

Tokens of all sequences are packed into one [T, D] batch (single-token steps first, then
prefill chunks). Per layer: `project` -> write `cat(latent, k_pe)` into the paged cache at
each token's slot -> attention -> MLP/MoE over all T rows at once.

Attention has two paths:
- single-token rows (decode) use the absorbed form: MQA over the gathered 576-wide cache
  vectors of each sequence (padded to the longest context in the step, masked);
- prefill chunks decompress K/V from the sequence's cached latents and run SDPA with the
  chunk's causal mask (memory per chunk is linear in the context length).
Only the rows that sample a token go through the final norm and lm_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layers = list(model.model.layers)
        attn0 = self.layers[0].self_attn
        self.rotary = attn0.rotary
        self.r = cfg.kv_lora_rank
        self.dr = cfg.qk_rope_head_dim
        self.width = self.r + self.dr
        self.dtype = dtype
        # [layers, slots, r + dr]: one preallocated tensor for the whole paged cache
        self.cache = torch.zeros(len(self.layers), num_blocks * block_size, self.width, dtype=dtype)

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * width * torch.empty((), dtype=dtype).element_size()

    # -- step inputs ------------------------------------------------------------------------
    def _slots(self, table: list[int], start: int, end: int) -> Tensor:
        """Cache slots of positions [start, end) of a sequence with block table `table`."""
        bs = self.block_size
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)
        return blocks[pos // bs] * bs + pos % bs

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], Tensor | None]:
        """Run the step; returns the sequences that sample and their logits [N, V]."""
        bs = self.block_size
        decodes = batch.decodes
        prefills = batch.prefills

        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in decodes:
            p = s.num_computed
            tokens.append(s.token_ids[p])
            positions.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
        tok_t = [torch.tensor(tokens, dtype=torch.long)]
        pos_t = [torch.tensor(positions, dtype=torch.long)]
        slot_t = [torch.tensor(slots, dtype=torch.long)]
        prefill_ctx: list[tuple[int, int, int, Tensor]] = []  # (row, chunk, context, blocks)
        row = len(decodes)
        # a single-token chunk may be the middle of a prompt (budget ran out): no sample then
        sample_rows = [i for i, s in enumerate(decodes) if s.num_computed + 1 == len(s.token_ids)]
        samplers = [decodes[i] for i in sample_rows]
        for s, n in prefills:
            start, end = s.num_computed, s.num_computed + n
            tok_t.append(torch.tensor(s.token_ids[start:end], dtype=torch.long))
            pos_t.append(torch.arange(start, end))
            slot_t.append(self._slots(s.block_table, start, end))
            ctx_blocks = torch.tensor(s.block_table[: -(-end // bs)], dtype=torch.long)
            prefill_ctx.append((row, n, end, ctx_blocks))
            row += n
            if end == len(s.token_ids):
                sample_rows.append(row - 1)
                samplers.append(s)
        input_ids = torch.cat(tok_t) if prefills else tok_t[0]
        pos = torch.cat(pos_t) if prefills else pos_t[0]
        slot_mapping = torch.cat(slot_t) if prefills else slot_t[0]

        # decode context: whole blocks of each decoding sequence, gathered in one index_select
        # (block-sized copies); positions past a sequence's length are masked out
        dec_blocks = dec_bias = None
        if decodes:
            lens = [s.num_computed + 1 for s in decodes]
            lmax = max(lens)
            nb = -(-lmax // bs)
            dec_blocks = torch.tensor(
                [s.block_table[:nb] + [0] * (nb - min(nb, len(s.block_table))) for s in decodes],
                dtype=torch.long,
            ).view(-1)  # [B * nb]
            if min(lens) != nb * bs:
                valid = torch.arange(nb * bs)[None, :] < torch.tensor(lens)[:, None]  # [B, L]
                dec_bias = torch.zeros(len(lens), 1, nb * bs, dtype=self.dtype)
                dec_bias.masked_fill_(~valid[:, None, :], float("-inf"))

        h = self.forward(
            input_ids,
            pos,
            slot_mapping,
            len(decodes),
            dec_blocks,
            dec_bias,
            prefill_ctx,
            sample_rows,
        )
        return samplers, h

    # -- the forward pass -------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        slot_mapping: Tensor,
        num_decodes: int,
        dec_blocks: Tensor | None,
        dec_bias: Tensor | None,
        prefill_ctx: list[tuple[int, int, int, Tensor]],
        sample_rows: list[int],
    ) -> Tensor | None:
        m = self.model
        h = m.model.embed_tokens(input_ids)  # [T, D]
        rope = self.rotary.cos_sin(positions)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            attn = layer.self_attn
            q_nope, q_pe, latent, k_pe = attn.project(x, positions, rope)
            cache = self.cache[li]  # [slots, r + dr]
            cache.index_copy_(0, slot_mapping, torch.cat([latent, k_pe], dim=-1).to(cache.dtype))
            outs: list[Tensor] = []
            if num_decodes:
                outs.append(
                    self._decode_attention(
                        attn, cache, q_nope[:num_decodes], q_pe[:num_decodes], dec_blocks, dec_bias
                    )
                )
            for row, n, ctx_len, ctx in prefill_ctx:
                outs.append(
                    self._prefill_attention(
                        attn, cache, q_nope[row : row + n], q_pe[row : row + n], ctx_len, ctx
                    )
                )
            h = h + (outs[0] if len(outs) == 1 else torch.cat(outs))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if not sample_rows:
            return None
        if len(sample_rows) != h.shape[0]:
            h = h[torch.tensor(sample_rows, dtype=torch.long)]
        return m.lm_head(m.model.norm(h)).float()  # [N, V]

    def _decode_attention(
        self,
        attn: nn.Module,
        cache: Tensor,
        q_nope: Tensor,
        q_pe: Tensor,
        blocks: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        """Absorbed MLA for one new token per sequence: MQA over the latent cache."""
        b = q_nope.shape[0]
        paged = cache.view(self.num_blocks, self.block_size, self.width)
        kv = paged.index_select(0, blocks).view(b, -1, self.width)  # [B, L, r + dr]
        q = torch.cat([attn.absorb_query(q_nope), q_pe], dim=-1)  # [B, H, r + dr]
        scores = torch.bmm(q, kv.transpose(1, 2))  # [B, H, L]
        if bias is not None:
            scores = scores.mul_(attn.softmax_scale).add_(bias)
        else:
            scores = scores.mul_(attn.softmax_scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype)
        o_latent = torch.bmm(probs, kv[:, :, : self.r])  # [B, H, r]
        return attn.latent_to_output(o_latent)  # [B, D]

    def _prefill_attention(
        self,
        attn: nn.Module,
        cache: Tensor,
        q_nope: Tensor,
        q_pe: Tensor,
        ctx_len: int,
        ctx: Tensor,
    ) -> Tensor:
        """Decompressed MLA for a chunk of n tokens over its sequence's whole context."""
        n = q_nope.shape[0]
        paged = cache.view(self.num_blocks, self.block_size, self.width)
        kv = paged.index_select(0, ctx).view(-1, self.width)  # whole blocks
        s = ctx_len
        kv = kv[:s]  # [S, r + dr]
        latent, k_pe = kv.split([self.r, self.dr], dim=-1)
        k_nope, v = attn.decompress(latent)  # [S, H, dn], [S, H, dv]
        heads = k_nope.shape[1]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, n, dq]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(s, heads, self.dr)], dim=-1).transpose(0, 1)
        dq, dv = q.shape[-1], v.shape[-1]
        v = v.transpose(0, 1)  # [H, S, dv]
        if dv != dq:
            # equal head dims keep SDPA on its fused (flash) CPU kernel: O(n) extra memory
            v = F.pad(v, (0, dq - dv))
        if s == n:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.softmax_scale)
        else:
            # query i sits at position s - n + i and sees keys 0..s - n + i
            mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]  # [n, S]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.softmax_scale)
        return attn.output(o[..., :dv].transpose(0, 1))  # [n, D]
