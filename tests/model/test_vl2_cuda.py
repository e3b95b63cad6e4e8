"""DeepSeek-VL2 on a CUDA GPU (skipped without one): images embed on the GPU as on the CPU
(float32, TF32 off: within 1e-4 of the CPU, logits with images too), bfloat16 stays close,
and nothing is made off the GPU (meta default-device trap)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model
from model.image_processing import process_image
from model.tokenizer import Tokenizer
from tests.model.vl2_oracle import noise_picture, ours_logits, prompt_with_images
from tests.support.vl2_checkpoints import TINY_TILE, write_random_vl2_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_vl2_checkpoint(tmp_path_factory.mktemp("vl2cuda"), seed=2)


def pictures():
    return [noise_picture(2 * TINY_TILE + 9, TINY_TILE - 3, 1), noise_picture(60, 150, 2)]


def test_gpu_logits_with_images_match_the_cpu(checkpoint, no_tf32):
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    cpu = model.load_pretrained(checkpoint)
    gpu = model.load_pretrained(checkpoint, device="cuda")
    ids, starts, images = prompt_with_images(cpu, tokenizer, pictures())
    want = ours_logits(cpu, ids, starts, images)
    got = ours_logits(gpu, ids, starts, images)
    assert got.device.type == "cuda"
    assert (got.cpu() - want).abs().max().item() <= 1e-4


def test_gpu_bfloat16_and_nothing_off_the_device(checkpoint):
    ref = model.load_pretrained(checkpoint).embed_images(
        [
            process_image(p, model.load_pretrained(checkpoint).vl2_config.preprocess, True)
            for p in pictures()
        ]
    )
    torch.set_default_device("meta")
    try:
        m = model.load_pretrained(checkpoint, dtype=torch.bfloat16, device="cuda")
        with torch.inference_mode():
            rows = m.embed_images(
                [process_image(p, m.vl2_config.preprocess, True) for p in pictures()]
            )
    finally:
        torch.set_default_device(None)
    for got, want in zip(rows, ref, strict=True):
        assert got.device.type == "cuda" and got.dtype == torch.bfloat16
        assert (
            got.float().cpu() - want.detach()
        ).abs().max().item() < 0.05 * want.abs().max().item()
