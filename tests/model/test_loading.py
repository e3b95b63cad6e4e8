"""Checkpoint loading: sharded and single-file, fp32 and bf16, partial loads (no routed experts,
or one slice of them) that read only what they need, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from model import CheckpointError, ConfigError, LocalExpertExecutor
from model.loading import SafetensorsCheckpoint
from tests.model.conftest import load_oracle
from tests.support.checkpoints import write_random_checkpoint

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_checkpoint):
    sharded = write_random_checkpoint(tmp_path, seed=0, sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    a = model.load_pretrained(sharded)
    b = model.load_pretrained(tiny_checkpoint)  # same seed, one file
    assert torch.equal(logits(a), logits(b))


def test_bf16_checkpoint(tmp_path):
    path = write_random_checkpoint(tmp_path, seed=2, dtype=torch.bfloat16)
    as_fp32 = model.load_pretrained(path, torch.float32)
    want = logits(as_fp32)
    assert (want - load_oracle(path)(IDS).logits.detach()).abs().max() <= 1e-4
    as_bf16 = model.load_pretrained(path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in as_bf16.parameters())
    got = logits(as_bf16).float()
    from transformers import DeepseekV2ForCausalLM

    with torch.no_grad():
        ref = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(IDS)
    ref = ref.logits.float()
    # bf16 rounding: ours strays from fp32 no more than transformers' bf16 run does.
    assert (got - want).abs().mean() <= 1.5 * (ref - want).abs().mean()
    assert (got - ref).abs().mean() <= 0.01
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_our_save_pretrained_round_trips_and_transformers_reads_it(tmp_path, tiny_checkpoint):
    m = model.load_pretrained(tiny_checkpoint)
    out = model.save_pretrained(m, tmp_path / "copy", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(model.load_pretrained(out)), logits(m))
    assert (load_oracle(out)(IDS).logits.detach() - logits(m)).abs().max() <= 1e-4


def test_no_experts_plus_expert_slices_equals_full_model(tiny_checkpoint):
    full = model.load_pretrained(tiny_checkpoint)
    trunk = model.load_pretrained(tiny_checkpoint, experts="none")
    assert not any("experts.0." in n for n in trunk.state_dict())
    with pytest.raises(RuntimeError, match="set_expert_executor"):
        logits(trunk)
    low = model.load_routed_experts(tiny_checkpoint, 0, 4)
    high = model.load_routed_experts(tiny_checkpoint, 4, 8)
    assert sorted(low) == model.moe_layer_indices(full.config) == [1, 2]
    assert low[1].gate_up.shape == (4, 2 * 32, 64)
    trunk.set_expert_executor(LocalExpertExecutor({i: [low[i], high[i]] for i in low}))
    assert (logits(trunk) - logits(full)).abs().max() <= 1e-5
    # A model holding one slice computes that slice's partial sums (what a shard returns).
    half = model.load_pretrained(tiny_checkpoint, experts=(4, 8))
    assert half.moe_layers()[0].experts.start == 4


def _count_reads(monkeypatch) -> dict[str, int]:
    counts = {"bytes": 0, "tensors": 0}
    original = SafetensorsCheckpoint.read

    def counting_read(self, name, shape, dtype):
        t = original(self, name, shape, dtype)
        counts["bytes"] += t.numel() * t.element_size()
        counts["tensors"] += 1
        return t

    monkeypatch.setattr(SafetensorsCheckpoint, "read", counting_read)
    return counts


def test_slice_load_reads_only_the_slice(tiny_checkpoint, monkeypatch):
    counts = _count_reads(monkeypatch)
    slices = model.load_routed_experts(tiny_checkpoint, 2, 4)
    expected = sum(p.numel() * p.element_size() for s in slices.values() for p in s.parameters())
    assert counts["bytes"] == expected
    assert counts["tensors"] == 2 * 2 * 3  # 2 MoE layers x 2 experts x (gate, up, down)
    counts["bytes"] = counts["tensors"] = 0
    trunk = model.load_pretrained(tiny_checkpoint, experts="none")
    assert counts["bytes"] == sum(p.numel() * p.element_size() for p in trunk.parameters())


_RSS_PROBE = textwrap.dedent(
    """
    import sys, torch
    import model

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    start, end = int(sys.argv[2]), int(sys.argv[3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = status("VmRSS:")
    slices = model.load_routed_experts(sys.argv[1], start, end)
    print(status("VmHWM:") - before)
    """
)


def _peak_rss_growth(path: Path, start: int, end: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), str(start), str(end)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_memory_of_slice_load_is_proportional_to_slice(tmp_path):
    # 2 MoE layers x 16 experts x 3 x (256 x 1024) fp32 = 96 MiB of routed experts.
    path = write_random_checkpoint(
        tmp_path,
        seed=0,
        hidden_size=256,
        moe_intermediate_size=1024,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    per_expert = 3 * 256 * 1024 * 4 * 2  # bytes over both MoE layers
    full = _peak_rss_growth(path, 0, 16)
    one_eighth = _peak_rss_growth(path, 0, 2)
    assert full >= 16 * per_expert * 0.9  # the probe sees the real allocation
    # Peak = the slice's tensors + the (reclaimable, file-backed) mapped pages they were read
    # from + a fixed ~11 MiB; never the other 14 experts.
    assert one_eighth <= 2 * (2 * per_expert) + (16 << 20)
    assert one_eighth <= full / 4


def test_missing_tensor_is_named_with_expected_shape(tmp_path):
    path = write_random_checkpoint(tmp_path, seed=0)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight.*\(32, 64\)"
    ):
        model.load_pretrained(path)
    model.load_pretrained(path, experts=(0, 4))  # a slice without expert 5 still loads


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    path = write_random_checkpoint(tmp_path, seed=0)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(128, 31)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"kv_b_proj\.weight.*\(128, 31\).*expected \(128, 32\)"
    ):
        model.load_pretrained(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("topk_method", "aux_free", "topk_method='aux_free' is not supported"),
        ("scoring_func", "tanh", "scoring_func='tanh' is not supported"),
        # noaux_tc exists (DeepSeek-VL2) but routes on sigmoid scores only
        ("topk_method", "noaux_tc", "scoring_func must be 'sigmoid'"),
    ],
)
def test_unsupported_routing_fails_at_load(tmp_path, field, value, message):
    path = write_random_checkpoint(tmp_path, seed=0)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        model.load_pretrained(path)


def test_noaux_tc_checkpoint_without_its_correction_bias_is_named(tmp_path):
    from tests.support.variant_checkpoints import write_noaux_checkpoint

    path = write_noaux_checkpoint(tmp_path, seed=0)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mlp\.gate\.e_score_correction_bias.*\(16,\)"):
        model.load_pretrained(path)


def test_moe_layer_freq_and_first_k_dense(tmp_path):
    # transformers ignores moe_layer_freq, so this checkpoint is written by our own model.
    path = write_random_checkpoint(tmp_path, seed=0, num_hidden_layers=5, moe_layer_freq=2)
    m = model.load_pretrained(path)
    assert model.moe_layer_indices(m.config) == [2, 4]
    kinds = [type(layer.mlp).__name__ for layer in m.model.layers]
    assert kinds == [
        "DeepseekV2MLP",
        "DeepseekV2MLP",
        "DeepseekV2MoE",
        "DeepseekV2MLP",
        "DeepseekV2MoE",
    ]
    assert logits(m).shape == (2, 24, 512)
