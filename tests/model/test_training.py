"""The model trains: gradients reach every weight including the router, and the expert
balance loss is DeepSeek-V2's (per-sequence when seq_aux, else over the whole batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model
from model.moe import balance_loss


def test_balance_loss_formula():
    # 2 sequences x 2 tokens, 4 experts, top-1; alpha 1.
    scores = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]
    )
    ids = torch.tensor([[0], [1], [0], [0]])
    # seq 0: f = [1,1,0,0] * 4/2 = [2,2,0,0], P = [.4,.4,.1,.1] -> 1.6; seq 1: f = [4,0,0,0],
    # P = [.4,.4,.1,.1] -> 1.6; mean 1.6
    assert balance_loss(scores, ids, batch=2, alpha=1.0, per_sequence=True).item() == pytest.approx(
        1.6
    )
    # batch: f = [3,1,0,0] * 4/4, P = [.4,.4,.1,.1] -> 1.2 + 0.4 = 1.6
    assert balance_loss(
        scores, ids, batch=2, alpha=1.0, per_sequence=False
    ).item() == pytest.approx(1.6)
    # perfectly balanced uniform routing gives alpha * 1
    uniform = torch.full((4, 4), 0.25)
    assert balance_loss(
        uniform, torch.tensor([[0], [1], [2], [3]]), 1, 0.5, True
    ).item() == pytest.approx(0.5)


def test_gradients_reach_router_and_training_lowers_loss(tiny_checkpoint):
    torch.manual_seed(0)
    m = model.load_pretrained(tiny_checkpoint).train()
    ids = torch.randint(2, 512, (4, 33))
    logits, aux = m(ids[:, :-1], return_balance_loss=True)
    assert logits.shape == (4, 32, 512) and aux.ndim == 0 and aux.item() > 0
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux
    loss.backward()
    gate = m.model.layers[1].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert m.model.layers[2].mlp.experts.gate_up.grad.abs().sum() > 0
    assert m.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(15):
        opt.zero_grad()
        logits, aux = m(ids[:, :-1], return_balance_loss=True)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux
        loss.backward()
        opt.step()
    print(f"loss {first:.3f} -> {loss.item():.3f}")
    assert loss.item() < 0.7 * first


def test_logits_at_gives_the_full_passs_logits_at_those_positions_only(tiny_checkpoint):
    """`logits_at`: the head runs only where a loss is taken; the logits there, and the
    gradients they send back, are the full pass's."""
    torch.manual_seed(0)
    m = model.load_pretrained(tiny_checkpoint, dtype=torch.float32).train()
    ids = torch.randint(2, 512, (3, 20))
    keep = torch.rand(3, 20) < 0.4  # [B, T]
    full, full_aux = m(ids, return_balance_loss=True)
    full[keep].sum().backward()
    grad = m.model.layers[0].self_attn.kv_b_proj.weight.grad.clone()
    m.zero_grad()
    some, aux = m(ids, return_balance_loss=True, logits_at=keep)
    assert some.shape == (int(keep.sum()), 512)
    torch.testing.assert_close(some, full[keep])
    torch.testing.assert_close(aux, full_aux)
    some.sum().backward()
    torch.testing.assert_close(m.model.layers[0].self_attn.kv_b_proj.weight.grad, grad)
