"""Parameter counts and KV-cache sizes of the two published configs, from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import DeepseekV2Config
from model.accounting import (
    kv_cache_bytes_per_token,
    kv_cache_reduction,
    mha_cache_bytes_per_token,
    param_counts,
)

CONFIGS = Path(__file__).parent / "reference_configs"


def config(name: str) -> DeepseekV2Config:
    return DeepseekV2Config.from_pretrained(CONFIGS / f"{name}.config.json")


@pytest.mark.parametrize(
    ("name", "total", "active", "mla_bytes"),
    [("deepseek-v2", 236e9, 21e9, 69_120), ("deepseek-v2-lite", 15.7e9, 2.4e9, 31_104)],
)
def test_published_figures(name, total, active, mla_bytes):
    cfg = config(name)
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(total, rel=0.02)
    # Lite's active count is 2.45e9 (DeepSeek quote it as "2.4B"): 2.15% over, hence 2.5%.
    assert counts.active == pytest.approx(active, rel=0.025 if "lite" in name else 0.02)
    assert kv_cache_bytes_per_token(cfg, "bfloat16") == mla_bytes
    mha = mha_cache_bytes_per_token(cfg, "bfloat16")
    print(
        f"\n{name}: {counts.total / 1e9:.2f}B total, {counts.active / 1e9:.2f}B active; "
        f"KV cache per token bf16: MLA {mla_bytes:,} B vs MHA {mha:,} B "
        f"({kv_cache_reduction(cfg):.2%} smaller, {mha / mla_bytes:.1f}x)"
    )
    assert mha == cfg.num_hidden_layers * cfg.num_attention_heads * (192 + 128) * 2


def test_reference_configs_parse_every_field():
    raw = json.loads((CONFIGS / "deepseek-v2.config.json").read_text())
    cfg = config("deepseek-v2")
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["mscale_all_dim"] == 0.707
    assert cfg.q_lora_rank == 1536 and config("deepseek-v2-lite").q_lora_rank is None
    assert cfg.latent_cache_dim == 576


def test_transformers5_rope_parameters_read_as_legacy_rope_scaling():
    raw = json.loads((CONFIGS / "deepseek-v2-lite.config.json").read_text())
    legacy = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {**legacy, "rope_type": "yarn", "rope_theta": 10000.0}
    cfg = DeepseekV2Config.from_dict(raw)
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_type == "yarn"
