"""Fixtures for the tests that compare a CUDA run against float32 references."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """float32 on CUDA as float32: matmuls and cuDNN convolutions (the vision tower's patch
    embedding) would otherwise run in TF32, ~1e-3 off the CPU reference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
