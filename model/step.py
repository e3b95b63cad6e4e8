"""Per-step attention metadata: where a forward step's tokens sit in the paged latent cache.

The engine packs the tokens of every scheduled sequence into one [T] batch: one-token decode
rows first, then prefill chunks. ``StepMetadata`` tells attention, for that packed batch, which
cache slot each token's latent goes to and what context each row attends over (the role of
nano-vllm's ``Context`` or vLLM's attention metadata). Every tensor lives on the model's
device; plain ints stay on the host, so reading them costs no device sync.

The paged cache of one layer is ``[num_blocks, block_size, r + dr]``; slot ``s`` is row
``s`` of its ``[num_blocks * block_size, r + dr]`` view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class PrefillChunk:
    """``length`` consecutive tokens of one sequence, rows [start, start + length) of the batch."""

    start: int  # first row of the chunk in the packed batch
    length: int  # tokens in the chunk
    context_len: int  # the sequence's cached tokens after this step (earlier ones + the chunk)
    blocks: Tensor  # [ceil(context_len / block_size)] int64: the blocks holding that context


@dataclass
class StepMetadata:
    slot_mapping: Tensor  # [T] int64: the cache slot each token's latent is written to
    max_position: int  # the largest position in the step (sizes the RoPE table, no sync)
    num_decodes: int = 0  # rows [0, num_decodes) are one-token rows over a cached context
    # decode rows: whole context blocks of each row (padded to the longest), and an additive
    # mask (0 where a position is inside the row's context, -inf past it; None when every
    # row fills all its blocks)
    block_tables: Tensor | None = None  # [B, nb] int64
    decode_bias: Tensor | None = None  # [B, 1, nb * block_size], the model's dtype
    # decode rows' context lengths (cached tokens after the step, this one included); the
    # fused CPU decode (model.fused_decode) reads these instead of the bias
    decode_lens: Tensor | None = None  # [B] int64
    prefills: list[PrefillChunk] = field(default_factory=list)
    # rows whose hidden state goes through the final norm and lm_head (None: every row)
    sample_rows: Tensor | None = None  # [N] int64
