"""Engine test fixtures: tiny random checkpoints (transformers writes them: the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.checkpoints import write_random_checkpoint

# Two busy cores: one intra-op thread keeps small ops from waiting on a descheduled peer.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny config (q_lora, YaRN, group-limited routing, dense first layer)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("engine-ckpt"), seed=3)


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bigger hidden size so a 2,000-token prefill clearly costs more than a step's overhead."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("engine-wide"),
        seed=5,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=4096,
    )


@pytest.fixture(scope="session")
def vl2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-VL2: 56 px tiles (13 to 27 image tokens a picture), the shared
    tiny language model."""
    from tests.engine.vl2_support import write_vl2_checkpoint

    return write_vl2_checkpoint(tmp_path_factory.mktemp("engine-vl2"), seed=1)


@pytest.fixture(scope="session")
def vl2_wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepSeek-VL2 whose pictures dominate a prompt: 112 px tiles up to 3 x 3 (177 image
    tokens, 10 tiles through a 12-layer tower) before a few text tokens."""
    from tests.engine.vl2_support import write_vl2_checkpoint

    return write_vl2_checkpoint(
        tmp_path_factory.mktemp("engine-vl2-wide"),
        seed=2,
        tile=112,
        vision_width=192,
        vision_layers=12,
        max_tiles=3,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        q_lora_rank=None,
    )
