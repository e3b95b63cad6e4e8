"""Session fixtures: tiny random DeepSeek-V2 checkpoints shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.checkpoints import TINY_CONFIG, write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 3 layers (layer 0 dense), 8 routed experts in 4 groups, group_limited_greedy
    top-2 (topk_group 2), 1 shared expert, q_lora_rank set, YaRN, vocab 512 with a byte-level
    BPE tokenizer and the DeepSeek-V2-Chat chat template (bos id 0, eos id 1)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), seed=0)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """The config.json values of ``tiny_checkpoint``."""
    return dict(TINY_CONFIG)
