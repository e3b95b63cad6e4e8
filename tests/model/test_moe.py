"""Routed experts and the executor seam the engine and expert shards plug into."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model
from model import CompletedExperts, RoutedExperts


def naive_experts(experts: RoutedExperts, hidden, expert_ids, weights):
    """Row by row, choice by choice: the definition RoutedExperts.forward must match."""
    out = torch.zeros_like(hidden)
    inter = experts.intermediate_size
    for n in range(hidden.shape[0]):
        for k in range(expert_ids.shape[1]):
            e = int(expert_ids[n, k]) - experts.start
            if not 0 <= e < experts.num_experts:
                continue
            gate = experts.gate_up[e, :inter] @ hidden[n]
            up = experts.gate_up[e, inter:] @ hidden[n]
            out[n] += weights[n, k] * (experts.down[e] @ (F.silu(gate) * up))
    return out


def random_experts(start: int, end: int, seed: int = 0) -> RoutedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(16, 8, start, end)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g))
        experts.down.copy_(torch.randn(experts.down.shape, generator=g))
    return experts


def test_routed_experts_match_definition_and_slices_add_up():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g)
    expert_ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(37)])
    weights = torch.rand(37, 3, generator=g)
    full = random_experts(0, 8)
    with torch.no_grad():
        want = naive_experts(full, hidden, expert_ids, weights)
        # float32 sums in another order: AVX2 and AVX-512 kernels split dot products into 8 or
        # 16 lanes, which moved a result by 1.97e-5 on an AVX2-only CPU; a wrong expert or
        # weight moves it by O(1), so 1e-4 still catches every real error
        torch.testing.assert_close(full(hidden, expert_ids, weights), want, rtol=1e-4, atol=1e-4)
        low, high = RoutedExperts(16, 8, 0, 5), RoutedExperts(16, 8, 5, 8)
        low.load_state_dict(
            {k: v for k, v in full.state_dict().items() if int(k.split(".")[0]) < 5}
        )
        high.load_state_dict(
            {k: v for k, v in full.state_dict().items() if int(k.split(".")[0]) >= 5}
        )
        parts = low(hidden, expert_ids, weights) + high(hidden, expert_ids, weights)
        torch.testing.assert_close(parts, want, rtol=1e-4, atol=1e-4)
        # A slice nobody routed to contributes exactly zero.
        only_low = expert_ids % 5
        assert torch.equal(high(hidden, only_low, weights), torch.zeros(37, 16))


def test_state_dict_uses_published_per_expert_names():
    experts = random_experts(4, 6)
    assert sorted(experts.state_dict()) == [
        "4.down_proj.weight",
        "4.gate_proj.weight",
        "4.up_proj.weight",
        "5.down_proj.weight",
        "5.gate_proj.weight",
        "5.up_proj.weight",
    ]
    assert experts.state_dict()["5.gate_proj.weight"].shape == (8, 16)
    with pytest.raises(RuntimeError, match="Missing key"):
        RoutedExperts(16, 8, 4, 6).load_state_dict({})


class RecordingExecutor:
    """An executor like a remote one: hands back a pending result, records what it got."""

    def __init__(self, inner: model.LocalExpertExecutor) -> None:
        self.inner = inner
        self.calls: list[tuple[int, tuple, tuple]] = []

    def start(self, layer_idx, hidden, expert_ids, weights):
        self.calls.append((layer_idx, tuple(hidden.shape), tuple(expert_ids.shape)))
        assert expert_ids.dtype == torch.int64 and weights.dtype == torch.float32
        return CompletedExperts(self.inner.start(layer_idx, hidden, expert_ids, weights).wait())


def test_custom_executor_sees_every_moe_layer(tiny_checkpoint):
    full = model.load_pretrained(tiny_checkpoint)
    trunk = model.load_pretrained(tiny_checkpoint, experts="none")
    experts = model.load_routed_experts(tiny_checkpoint, 0, 8)
    executor = RecordingExecutor(model.LocalExpertExecutor(experts))
    assert isinstance(executor, model.ExpertExecutor)
    trunk.set_expert_executor(executor)
    ids = torch.tensor([[0, 5, 9, 200, 33]])
    with torch.no_grad():
        torch.testing.assert_close(trunk(ids), full(ids), rtol=0, atol=1e-5)
    assert executor.calls == [(1, (5, 64), (5, 2)), (2, (5, 64), (5, 2))]
    trunk.set_expert_executor(None)
    with pytest.raises(RuntimeError, match="experts='none'"):
        trunk(ids)


def test_route_contract(tiny_checkpoint):
    m = model.load_pretrained(tiny_checkpoint)
    moe = m.model.layers[1].mlp
    assert isinstance(moe, model.DeepseekV2MoE) and moe.shared_experts is not None
    ids, weights = moe.route(torch.randn(9, 64))
    assert ids.shape == weights.shape == (9, 2)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ((ids >= 0) & (ids < 8)).all()
    # group-limited: 8 experts in 4 groups of 2, at most topk_group=2 groups per token
    assert all(len(set((row // 2).tolist())) <= 2 for row in ids)


def test_shared_experts_run_while_routed_experts_are_pending(tiny_checkpoint):
    """A remote executor's shards work between start() and wait(); the layer computes its
    shared experts in that window."""
    m = model.load_pretrained(tiny_checkpoint, experts="none")
    experts = model.LocalExpertExecutor(model.load_routed_experts(tiny_checkpoint, 0, 8))
    events: list[str] = []

    class Pending:
        def __init__(self, result):
            self.result = result

        def wait(self):
            events.append("wait")
            return self.result

    class Executor:
        def start(self, layer_idx, hidden, expert_ids, weights):
            events.append(f"start{layer_idx}")
            return Pending(experts.start(layer_idx, hidden, expert_ids, weights).wait())

    m.set_expert_executor(Executor())
    for moe in m.moe_layers():
        moe.shared_experts.register_forward_hook(lambda *_: events.append("shared"))
    with torch.no_grad():
        m(torch.tensor([[3, 4, 5]]))
    assert events == ["start1", "shared", "wait", "start2", "shared", "wait"]
