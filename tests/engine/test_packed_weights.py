"""The inference re-layouts the engine applies (packed experts and MLPs) change no results.

RoutedExperts has four paths (one row; a loop for fewer assignments than experts; padded
batched matmuls for a few half-precision rows per expert, as in a bf16 decode step; the
grouped matmul otherwise); each must equal the per-expert definition, before and after
``pack_for_inference``, also for a slice.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.moe import DeepseekV2MLP, RoutedExperts
from model.packing import transpose_for_inference


def _experts(start: int, end: int) -> RoutedExperts:
    g = torch.Generator().manual_seed(start * 100 + end)
    experts = RoutedExperts(16, 8, start, end)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g))
        experts.down.copy_(torch.randn(experts.down.shape, generator=g))
    return experts


def _definition(experts: RoutedExperts, hidden, expert_ids, weights):
    out = torch.zeros(hidden.shape[0], experts.hidden_size)
    inter = experts.intermediate_size
    for n in range(hidden.shape[0]):
        for k in range(expert_ids.shape[1]):
            e = int(expert_ids[n, k]) - experts.start
            if 0 <= e < experts.num_experts:
                gate = experts.gate_up[e, :inter] @ hidden[n]
                up = experts.gate_up[e, inter:] @ hidden[n]
                out[n] += weights[n, k] * (experts.down[e] @ (F.silu(gate) * up))
    return out


def _routing(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows tokens, each routed to 3 distinct experts of 8."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 16, generator=g)
    expert_ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(rows)])
    weights = torch.rand(rows, 3, generator=g)
    return hidden, expert_ids, weights


# rows -> path over all 8 experts in float32: 1 single row, 2 loop (6 assignments < 8
# experts), 6 / 37 / 200 grouped
@pytest.mark.parametrize("rows", [1, 2, 6, 37, 200])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("span", [(0, 8), (3, 6)])
def test_routed_expert_paths_match_definition(rows, packed, span):
    hidden, expert_ids, weights = _routing(rows, seed=rows)
    experts = _experts(*span)
    with torch.inference_mode():
        want = _definition(experts, hidden, expert_ids, weights)
        if packed:
            experts.pack_for_inference()
        got = experts(hidden, expert_ids, weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# bfloat16, 6 and 37 rows (2 and 14 per expert): the padded bmm path; 200 rows: grouped
@pytest.mark.parametrize("rows", [6, 37, 200])
@pytest.mark.parametrize("span", [(0, 8), (3, 6)])
def test_bfloat16_paths_match_definition(rows, span):
    hidden, expert_ids, weights = _routing(rows, seed=rows)
    experts = _experts(*span)
    with torch.inference_mode():
        want = _definition(experts, hidden, expert_ids, weights)
        experts.to(torch.bfloat16).pack_for_inference()
        got = experts(hidden.bfloat16(), expert_ids, weights).float()
    # bfloat16 keeps 8 bits of mantissa: about 1% relative error through two matmuls
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize(
    ("rows", "dtype", "padded"),
    [
        (2, torch.bfloat16, False),
        (6, torch.bfloat16, True),
        (37, torch.bfloat16, True),
        (200, torch.bfloat16, False),
        (37, torch.float32, False),
    ],
)
def test_padded_path_serves_few_half_precision_rows_per_expert(rows, dtype, padded, monkeypatch):
    """Without the C++ fused experts (model.cpu_ext, tested in tests/model/test_cpu_ext.py):
    decode-sized half-precision batches take the padded bmm path; prefill-sized ones and
    float32 take the grouped kernel."""
    monkeypatch.setattr("model.moe.EXT_MAX_ROWS_PER_EXPERT", {})
    calls = []
    original = RoutedExperts._padded

    def spy(self, *args):
        calls.append(rows)
        return original(self, *args)

    monkeypatch.setattr(RoutedExperts, "_padded", spy)
    experts = _experts(0, 8).to(dtype)
    experts.pack_for_inference()
    hidden, expert_ids, weights = _routing(rows, seed=rows)
    with torch.inference_mode():
        experts(hidden.to(dtype), expert_ids, weights)
    assert bool(calls) == padded


def test_training_takes_the_path_with_a_backward():
    hidden, expert_ids, weights = _routing(37, seed=1)
    experts = _experts(0, 8)
    hidden.requires_grad_(True)
    out = experts(hidden, expert_ids, weights)
    out.sum().backward()
    assert hidden.grad is not None and experts.gate_up.grad is not None
    torch.testing.assert_close(
        out.detach(),
        _definition(experts, hidden.detach(), expert_ids, weights),
        rtol=1e-4,
        atol=1e-4,
    )


def test_packed_mlp_matches_unpacked():
    from model.config import DeepseekV2Config

    cfg = DeepseekV2Config(hidden_size=16, intermediate_size=24)
    torch.manual_seed(0)
    mlp = DeepseekV2MLP(cfg)
    x = torch.randn(5, 16)
    with torch.inference_mode():
        want = mlp(x)
        mlp.pack_for_inference()
        torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)
        assert mlp.gate_proj.weight.shape == (24, 16)  # same shapes, new strides


def test_half_precision_packing_keeps_row_major_weights():
    """bf16 one-row kernels read row-major weights faster: packing only fuses gate and up."""
    from model.config import DeepseekV2Config

    cfg = DeepseekV2Config(hidden_size=16, intermediate_size=24)
    torch.manual_seed(0)
    mlp = DeepseekV2MLP(cfg).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = mlp(x)
        mlp.pack_for_inference()
        torch.testing.assert_close(mlp(x), want)  # within bfloat16 tolerance
    assert mlp.gate_proj.weight.stride() == (16, 1)
    assert mlp.down_proj.weight.stride() == (24, 1)
    experts = _experts(0, 8).to(torch.bfloat16)
    experts.pack_for_inference()
    assert experts.gate_up.is_contiguous() and experts.down.is_contiguous()


# The path accelerators take (no host sync, so a CUDA graph can capture it): the grouped
# matmul over all N*K assignments where the device has one, else each expert padded to N rows
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("rows", [1, 6, 37])
@pytest.mark.parametrize("span", [(0, 8), (3, 6)])
def test_sync_free_path_matches_definition(rows, span, grouped, monkeypatch):
    import model.moe as moe

    if not grouped:
        monkeypatch.setattr(moe, "_grouped_mm_supported", lambda x: False)
    elif moe._GROUPED_MM is None:
        pytest.skip("this torch has no torch._grouped_mm")
    hidden, expert_ids, weights = _routing(rows, seed=rows)
    experts = _experts(*span)
    experts.sync_free = True
    with torch.inference_mode():
        want = _definition(experts, hidden, expert_ids, weights)
        experts.pack_for_inference()
        got = experts(hidden, expert_ids, weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_projections_are_views_of_one_matrix(tiny_checkpoint):
    """Packing fuses q/q_a + kv_a and gate + up without keeping any weight twice."""
    import model

    for dtype in (torch.float32, torch.bfloat16):
        m = model.load_pretrained(tiny_checkpoint, dtype=dtype)
        m.pack_for_inference()
        m.pack_for_inference()  # idempotent
        attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        fused = attn._qkv_a
        assert fused is not None and fused.shape[0] == (
            attn.q_a_proj.weight.shape[0] + attn.kv_a_proj_with_mqa.weight.shape[0]
        )
        for member in (attn.q_a_proj, attn.kv_a_proj_with_mqa):
            assert member.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        for member in (mlp.gate_proj, mlp.up_proj):
            assert (
                member.weight.untyped_storage().data_ptr()
                == mlp._gate_up.untyped_storage().data_ptr()
            )
        # float32 weights stored transposed for torch's kernels, row-major for the C++ ones
        # (model.cpu_ext) and in half precision
        assert (fused.stride(0) == 1) == transpose_for_inference(dtype)
