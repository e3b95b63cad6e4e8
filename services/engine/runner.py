"""One engine step: scheduled sequences -> the model's inputs -> logits of the sampling rows.

The model owns the forward (``model(input_ids, positions, step)``, see model.transformer);
the runner owns the paged cache (per token and layer: MLA's latent row, or MHA's keys and
values; ``config.cache_dim`` values) and turns a ``ScheduledBatch`` into the packed inputs
and the step's ``StepMetadata``: single-token rows first, then prefill chunks. Every tensor
it makes is on the engine's device, built from one host list in one copy.

A step with rows at image positions runs on ``inputs_embeds``: the token embeddings with
those rows replaced by the images' embedding rows (services.engine.images), each request's
images embedded once, at the first step that needs them (or taken from a small cache of
recently seen pictures); other steps pass ``input_ids``.

Decode-only steps on CUDA replay captured graphs (services.engine.graphs), padded to a set
of batch sizes; other steps, and every step on the CPU, run the model eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from model.kernels import cpu_kernels
from model.step import PrefillChunk, StepMetadata
from services.engine.graphs import CapturedDecode, can_capture
from services.engine.images import EmbeddingCache, ensure_embeddings, splice
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence
from services.engine.step_inputs import PackedBatch, pack_batch

log = logging.getLogger(__name__)


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
        fused_decode: bool = True,
        max_batch_size: int = 64,
        max_model_len: int | None = None,
        image_cache_bytes: int = 0,
    ):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        # values per token per layer: MLA's latent row, or MHA's keys and values
        self.width = cfg.cache_dim
        model.pack_for_inference(prepack=prepack)
        # [layers, blocks, block_size, width]: one preallocated tensor for the whole paged
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
        self.images_embedded = 0  # images run through the vision tower so far
        self.image_cache = EmbeddingCache(image_cache_bytes)
        self.captured: CapturedDecode | None = None
        if cuda_graphs and self.device.type == "cuda" and can_capture(model):
            self.captured = CapturedDecode.for_cuda(self, max_batch_size, max_len)
            log.info(
                "decode steps on %s: CUDA graphs for batch sizes %s (captured on first use)",
                self.device,
                self.captured.batch_sizes,
            )
        elif self.device.type == "cpu" and fused_decode and cpu_kernels().ext_ops is not None:
            log.info("decode steps on the CPU: fused C++ layers (model.fused_decode)")
        else:
            if self.device.type == "cuda":
                why = (
                    "off (cuda_graphs=False)"
                    if not cuda_graphs
                    else "a remote expert executor is set"
                )
            elif not fused_decode:
                why = "off (fused_decode=False)"
            else:
                why = f"C++ kernels unavailable: {cpu_kernels().ext_why}"
            log.info("decode steps on %s: eager (%s)", self.device, why)
        model.set_fused_decode(fused_decode)

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        return config.num_hidden_layers * config.cache_dim * dtype.itemsize

    @property
    def cache_bytes(self) -> int:
        """Bytes of the paged cache (all layers and blocks)."""
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
        packed = pack_batch(batch, self.block_size)
        samplers = packed.samplers
        if (
            self.captured is not None
            and packed.decode_only
            and not packed.image_rows
            and self.captured.fits(packed.num_decodes, packed.blocks)
        ):
            logits = self.captured.run(packed)  # [B, V]
            if not samplers:
                return samplers, None
            if len(packed.sample_rows) != packed.num_decodes:
                logits = logits.index_select(0, self._tensor(packed.sample_rows))
            return samplers, logits
        input_ids, positions, step = self.prepare(packed)
        if packed.image_rows:
            self.images_embedded += ensure_embeddings(
                self.model, packed.image_rows, self.image_cache
            )
            embeds = splice(self.model.embed_tokens(input_ids), packed.image_rows)  # [T, D]
            logits = self.model(None, positions, step, inputs_embeds=embeds)
        else:
            logits = self.model(input_ids, positions, step)
        return samplers, (logits if samplers else None)

    def prepare(self, packed: PackedBatch) -> tuple[Tensor, Tensor, StepMetadata]:
        """The model's inputs on the engine's device: input_ids [T], positions [T] and the
        step metadata, all views of one host -> device copy."""
        # the step still runs (it writes the cache) when nobody samples: one row reaches the
        # head then, and its logits are dropped
        rows = packed.sample_rows if packed.samplers else [len(packed.tokens) - 1]
        t, b, nb = len(packed.tokens), packed.num_decodes, packed.blocks
        all_rows = len(rows) == t
        flat = self._tensor(
            packed.tokens
            + packed.positions
            + packed.slots
            + packed.lens
            + packed.tables
            + packed.chunk_blocks
            + ([] if all_rows else rows)
        )
        sizes = [t, t, t, b, b * nb, len(packed.chunk_blocks), 0 if all_rows else len(rows)]
        input_ids, positions, slot_mapping, lens, tables, blocks, rows_t = flat.split(sizes)
        chunks: list[PrefillChunk] = []
        begin = 0
        for first, n, context, n_blocks in packed.chunks:
            chunks.append(PrefillChunk(first, n, context, blocks[begin : begin + n_blocks]))
            begin += n_blocks
        full = b and min(packed.lens) == nb * self.block_size  # no row needs a mask
        step = StepMetadata(
            slot_mapping=slot_mapping,
            max_position=max(packed.positions),
            num_decodes=b,
            block_tables=tables.view(b, nb) if b else None,
            decode_bias=self.decode_bias(lens, nb * self.block_size) if b and not full else None,
            decode_lens=lens if b else None,
            prefills=chunks,
            sample_rows=None if all_rows else rows_t,
        )
        return input_ids, positions, step
