"""MoE layers go through the expert executor the engine is given; bf16 runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import LocalExpertExecutor, load_routed_experts
from model.kernels import cpu_kernels
from services.engine import Engine, SamplingParams

PROMPTS = [[5, 6, 7, 8], list(range(2, 60)), [9]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


class CountingExecutor(LocalExpertExecutor):
    """Expert slices held elsewhere (here: two halves in this process), calls counted."""

    def __init__(self, experts):
        super().__init__(experts)
        self.calls = 0
        self.rows = 0

    def start(self, layer_idx, hidden, expert_ids, weights):
        self.calls += 1
        self.rows += hidden.shape[0]
        return super().start(layer_idx, hidden, expert_ids, weights)


def test_engine_without_routed_experts_uses_the_given_executor(engine_checkpoint: Path):
    reference = Engine.from_pretrained(engine_checkpoint).generate(PROMPTS, GREEDY)
    halves = [
        load_routed_experts(engine_checkpoint, 0, 4),
        load_routed_experts(engine_checkpoint, 4, 8),
    ]
    executor = CountingExecutor(
        {layer: [halves[0][layer], halves[1][layer]] for layer in halves[0]}
    )
    engine = Engine.from_pretrained(engine_checkpoint, experts="none", expert_executor=executor)
    assert all(layer.mlp.experts is None for layer in engine.model.model.layers[1:])
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    # one call per MoE layer per step, over exactly the packed rows of that step
    assert executor.calls > 0 and executor.calls % 2 == 0  # two MoE layers
    prompt_rows = sum(len(p) for p in PROMPTS)
    assert executor.rows == 2 * (prompt_rows + len(PROMPTS) * (GREEDY.max_tokens - 1))


def test_bfloat16_engine_keeps_a_bf16_cache_and_agrees_on_the_first_tokens(engine_checkpoint: Path):
    fp32 = Engine.from_pretrained(engine_checkpoint).generate(PROMPTS, GREEDY)
    engine = Engine.from_pretrained(engine_checkpoint, dtype=torch.bfloat16)
    assert engine.runner.cache.dtype == torch.bfloat16
    bf16 = engine.generate(PROMPTS, GREEDY)
    assert all(len(o.token_ids) == 12 for o in bf16)
    assert sum(a.token_ids[:3] == b.token_ids[:3] for a, b in zip(fp32, bf16, strict=True)) >= 2
    assert engine.metrics.cache_blocks_used == 0


@pytest.mark.skipif(
    not cpu_kernels().can_prepack(torch.bfloat16),
    reason=f"this CPU cannot pre-pack bf16: {cpu_kernels().why_not.get(torch.bfloat16)}",
)
def test_prepacked_bf16_weights_change_no_results(engine_checkpoint: Path):
    packed = Engine.from_pretrained(engine_checkpoint, dtype=torch.bfloat16)
    plain = Engine.from_pretrained(engine_checkpoint, dtype=torch.bfloat16, prepack_weights=False)
    fp32 = Engine.from_pretrained(engine_checkpoint)
    # bf16 on CPU keeps pre-packed copies of what decode reads besides the routed experts;
    # float32 and prepack_weights=False keep none
    assert packed.model.lm_head.packed is not None
    assert packed.model.model.layers[0].self_attn.o_proj.packed is not None
    assert plain.model.lm_head.packed is None and fp32.model.lm_head.packed is None
    # a multi-row pass goes through every packed weight (attention output, MLPs, lm_head)
    ids = torch.tensor([PROMPTS[1]])  # [1, 58]
    with torch.inference_mode():
        got, want = packed.model(ids).float(), plain.model(ids).float()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale  # bf16 rounding, not another function
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
