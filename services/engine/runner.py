"""One engine step: scheduled sequences -> the model's inputs -> logits of the sampling rows.

The model owns the forward (``model(input_ids, positions, step)``, see model.transformer);
the runner owns the paged latent cache and turns a ``ScheduledBatch`` into the packed inputs
and the step's ``StepMetadata``: single-token rows first, then prefill chunks. Every tensor
it makes is on the engine's device, built from one host list in one copy.

Decode-only steps on CUDA replay captured graphs (services.engine.graphs), padded to a set
of batch sizes; other steps, and every step on the CPU, run the model eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.step import PrefillChunk, StepMetadata
from services.engine.graphs import CapturedDecode, can_capture
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        prepack: bool = True,
        *,
        cuda_graphs: bool = True,
        max_batch_size: int = 64,
        max_model_len: int | None = None,
    ):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        model.pack_for_inference(prepack=prepack)
        # [layers, blocks, block_size, r + dr]: one preallocated tensor for the whole paged
        # cache. Block `num_blocks` is never handed out: padding rows of a captured decode
        # step write there.
        self.dummy_block = num_blocks
        self.cache = torch.zeros(
            cfg.num_hidden_layers,
            num_blocks + 1,
            block_size,
            self.width,
            dtype=dtype,
            device=self.device,
        )
        model.bind_kv_cache(self.cache)
        max_len = max_model_len or cfg.max_position_embeddings
        self.captured: CapturedDecode | None = None
        if cuda_graphs and self.device.type == "cuda" and can_capture(model):
            self.captured = CapturedDecode.for_cuda(self, max_batch_size, max_len)

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * width * torch.empty((), dtype=dtype).element_size()

    @property
    def cache_bytes(self) -> int:
        """Bytes of the paged latent cache (all layers and blocks)."""
        return self.cache.numel() * self.cache.element_size()

    def _tensor(self, values: list[int]) -> Tensor:
        """One host -> device copy of int64 values."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def decode_bias(self, lens: Tensor, num_keys: int) -> Tensor:
        """[B, 1, num_keys] in the cache dtype: 0 for keys inside each row's context (its
        first ``lens[b]`` positions), -inf past it."""
        keys = torch.arange(num_keys, device=self.device)
        bias = torch.zeros(lens.shape[0], 1, num_keys, dtype=self.dtype, device=self.device)
        return bias.masked_fill_((keys[None, :] >= lens[:, None])[:, None, :], float("-inf"))

    # -- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], Tensor | None]:
        """Run the step; returns the sequences that sample and their logits [N, V] (in the
        model's dtype), or None when no sequence samples."""
        bs = self.block_size
        decodes, prefills = batch.decodes, batch.prefills
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in decodes:
            p = s.num_computed
            tokens.append(s.token_ids[p])
            positions.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
        # a single-token chunk may be the middle of a prompt (budget ran out): no sample then
        sample_rows = [i for i, s in enumerate(decodes) if s.num_computed + 1 == len(s.token_ids)]
        samplers = [decodes[i] for i in sample_rows]
        lens = [s.num_computed + 1 for s in decodes]
        nb = -(-max(lens) // bs) if decodes else 0
        tables: list[int] = []
        for s in decodes:  # padded with block 0: positions past a row's length are masked
            row = s.block_table[:nb]
            tables.extend(row + [0] * (nb - len(row)))
        if (
            self.captured is not None
            and decodes
            and not prefills
            and self.captured.fits(len(decodes), nb)
        ):
            logits = self.captured.run(tokens, positions, slots, tables, lens, nb)  # [B, V]
            if not samplers:
                return samplers, None
            if len(sample_rows) != len(decodes):
                logits = logits.index_select(0, self._tensor(sample_rows))
            return samplers, logits

        chunk_spans: list[tuple[int, int, int, int]] = []  # (row, n, context, blocks)
        chunk_blocks: list[int] = []
        row = len(decodes)
        for s, n in prefills:
            start, end = s.num_computed, s.num_computed + n
            table = s.block_table
            tokens.extend(s.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            blocks = table[: -(-end // bs)]
            chunk_spans.append((row, n, end, len(blocks)))
            chunk_blocks.extend(blocks)
            row += n
            if end == len(s.token_ids):
                sample_rows.append(row - 1)
                samplers.append(s)
        # the step still runs (it writes the cache) when nobody samples: one row reaches the
        # head then, and its logits are dropped
        rows = sample_rows if samplers else [len(tokens) - 1]
        # everything in one host -> device copy, then views of it
        t, b = len(tokens), len(decodes)
        all_rows = len(rows) == t
        flat = self._tensor(
            tokens + positions + slots + lens + tables + chunk_blocks + ([] if all_rows else rows)
        )
        parts = flat.split([t, t, t, b, b * nb, len(chunk_blocks), 0 if all_rows else len(rows)])
        input_ids, pos, slot_mapping, lens_t, tables_t, blocks_t, rows_t = parts
        chunks: list[PrefillChunk] = []
        begin = 0
        for row0, n, ctx, n_blocks in chunk_spans:
            chunks.append(PrefillChunk(row0, n, ctx, blocks_t[begin : begin + n_blocks]))
            begin += n_blocks
        step = StepMetadata(
            slot_mapping=slot_mapping,
            max_position=max(positions),
            num_decodes=b,
            block_tables=tables_t.view(b, nb) if b else None,
            decode_bias=self.decode_bias(lens_t, nb * bs) if b and min(lens) != nb * bs else None,
            prefills=chunks,
            sample_rows=None if all_rows else rows_t,
        )
        logits = self.model(input_ids, pos, step)
        return samplers, (logits if samplers else None)
