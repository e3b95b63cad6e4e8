"""Model tests: one torch thread (the machine is shared), fp32, transformers as the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def load_oracle(path: Path):
    """transformers' own DeepseekV2ForCausalLM from a checkpoint directory, fp32, eval."""
    from transformers import DeepseekV2ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def oracle():
    return load_oracle
