"""The shipped demo checkpoint, as every test here reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.demo.evaluate import DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    # Shipped in the repository (package data); a missing file is a failure, not a skip.
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (DEFAULT_CHECKPOINT / name).is_file(), f"demo checkpoint lacks {name}"
    return DEFAULT_CHECKPOINT
