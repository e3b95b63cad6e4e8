"""Captured decode steps: a decode-only step replayed from a graph instead of run op by op.

A small model's decode step is mostly per-op launch and Python overhead; on CUDA a graph
replays the whole step's kernels with one call. A graph has fixed shapes and fixed input
addresses, so:
- inputs live in static buffers, sized once for the largest batch, refilled each step;
- a step of B sequences runs the graph of the smallest batch size >= B from a fixed set
  (``batch_buckets``), and the graph of the smallest power-of-two block count >= the longest
  context; padding rows read token 0 at position 0, write their latent into a dummy cache
  block nobody owns, and attend over that block alone (their logits are dropped);
- nothing inside may read a device value on the host: the RoPE table is built up front for
  the whole context, and routed experts take their sync-free path (model.moe).

Graphs are captured lazily, on the first step of each (batch size, blocks) shape. How a step
is captured is a parameter: ``cuda_graph`` on CUDA; on the CPU the same static-buffer step
runs eagerly (``eager``), which is how tests check the padding and bucketing give the same
tokens as the plain step, without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from model.step import StepMetadata

if TYPE_CHECKING:
    from services.engine.runner import ModelRunner
    from services.engine.step_inputs import PackedBatch

StepFn = Callable[[], Tensor]


def can_capture(model: nn.Module) -> bool:
    """Whether a decode step stays on the device: every MoE layer runs its own routed experts
    (an expert executor set on the model may call out over the network)."""
    return all(moe._executor is None and moe.experts is not None for moe in model.moe_layers())


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes graphs are captured for: 1, 2, 4, 8, then every 16, up to the largest."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


def eager(fn: StepFn) -> StepFn:
    """The 'capture' that runs the static-buffer step as it is (CPU, tests)."""
    return fn


class CudaGraphCapture:
    """Captures a step into a CUDA graph; all graphs share one memory pool (only one replays
    at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = None

    def __call__(self, fn: StepFn) -> StepFn:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up: lazy initialisation stays out of the graph
            for _ in range(2):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay


class CapturedDecode:
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int,
        max_model_len: int,
        capture: Callable[[StepFn], StepFn] = eager,
    ) -> None:
        self.model = runner.model
        self.device = dev = runner.device
        self.dtype = runner.dtype
        self.block_size = bs = runner.block_size
        self.dummy_block = runner.dummy_block
        self.batch_sizes = batch_buckets(max_batch_size)
        self.max_blocks = -(-max_model_len // bs)
        # every position a captured step may see (whole blocks) has its RoPE entry up front
        self.max_position = self.max_blocks * bs - 1
        self.model.model.rotary.reserve(self.max_position + 1, dev)
        n = self.batch_sizes[-1]
        # static inputs, refilled every step (their addresses are what a graph reads)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.dummy_block * bs, dtype=torch.long, device=dev)
        self.lens = torch.ones(n, dtype=torch.long, device=dev)
        self.tables = torch.full(
            (n, self.max_blocks), self.dummy_block, dtype=torch.long, device=dev
        )
        self.key_pos = torch.arange(self.max_blocks * bs, device=dev)
        self._capture = capture
        self._steps: dict[tuple[int, int], StepFn] = {}

    @classmethod
    def for_cuda(
        cls, runner: ModelRunner, max_batch_size: int, max_model_len: int
    ) -> CapturedDecode:
        return cls(runner, max_batch_size, max_model_len, CudaGraphCapture(runner.device))

    @property
    def num_captured(self) -> int:
        return len(self._steps)

    def fits(self, batch: int, blocks: int) -> bool:
        return batch <= self.batch_sizes[-1] and blocks <= self.max_blocks

    def bucket(self, batch: int, blocks: int) -> tuple[int, int]:
        """(padded batch size, padded block count) of the graph that runs this step."""
        padded = next(s for s in self.batch_sizes if s >= batch)
        return padded, min(1 << max(blocks - 1, 0).bit_length(), self.max_blocks)

    def _step(self, batch: int, blocks: int) -> Tensor:
        """The decode step over the first ``batch`` rows of the static buffers -> [batch, V]."""
        num_keys = blocks * self.block_size
        past = self.key_pos[:num_keys][None, :] >= self.lens[:batch, None]  # [B, L]
        bias = torch.zeros(batch, 1, num_keys, dtype=self.dtype, device=self.device)
        bias.masked_fill_(past[:, None, :], float("-inf"))
        step = StepMetadata(
            slot_mapping=self.slots[:batch],
            max_position=self.max_position,
            num_decodes=batch,
            block_tables=self.tables[:batch, :blocks],
            decode_bias=bias,
        )
        return self.model(self.input_ids[:batch], self.positions[:batch], step)

    def _pad_all(self) -> None:
        """Every row a padding row (what capture runs on: it then writes the dummy block only)."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slots.fill_(self.dummy_block * self.block_size)
        self.lens.fill_(1)
        self.tables.fill_(self.dummy_block)

    def _fill(self, packed: PackedBatch, padded: int, padded_blocks: int) -> None:
        """Copy a step's inputs into the static buffers, padding rows and block tables."""
        b, pad, blocks = packed.num_decodes, padded - packed.num_decodes, packed.blocks
        dummy = self.dummy_block
        tables: list[int] = []
        for i in range(b):  # real rows' tables padded to the bucket with the dummy block
            tables += packed.tables[i * blocks : (i + 1) * blocks]
            tables += [dummy] * (padded_blocks - blocks)
        tables += [dummy] * (pad * padded_blocks)
        flat = torch.tensor(
            packed.tokens
            + [0] * pad
            + packed.positions
            + [0] * pad
            + packed.slots
            + [dummy * self.block_size] * pad
            + packed.lens
            + [1] * pad
            + tables,
            dtype=torch.long,
            device=self.device,
        )
        ids, pos, slot, n, table = flat.split([padded] * 4 + [padded * padded_blocks])
        self.input_ids[:padded].copy_(ids)
        self.positions[:padded].copy_(pos)
        self.slots[:padded].copy_(slot)
        self.lens[:padded].copy_(n)
        self.tables[:padded, :padded_blocks].copy_(table.view(padded, padded_blocks))

    def run(self, packed: PackedBatch) -> Tensor:
        """A decode-only step -> logits [B, V] of every row (a view of the graph's output:
        read it before the next step)."""
        padded, padded_blocks = self.bucket(packed.num_decodes, packed.blocks)
        key = (padded, padded_blocks)
        step = self._steps.get(key)
        if step is None:
            self._pad_all()
            step = self._steps[key] = self._capture(
                functools.partial(self._step, padded, padded_blocks)
            )
        self._fill(packed, padded, padded_blocks)
        return step()[: packed.num_decodes]
