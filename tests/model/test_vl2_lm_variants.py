"""Whole-model logits with images (tests/model/test_vl2_exactness.py's check) for the two
DeepSeek-VL2 language models beyond V2's: VL2 (``noaux_tc`` routing) against an oracle whose
language part is transformers' DeepseekV3ForCausalLM, VL2-Tiny (``use_mla: false``) against
one whose language part is transformers' DeepseekV2ForCausalLM with LlamaAttention (see
tests/support/variant_checkpoints.py); both run with ``inputs_embeds``. Max |difference|
<= 1e-4 in float32 on small random configs."""

from __future__ import annotations

import pytest

from tests.model.vl2_oracle import check_against_oracle, noise_picture
from tests.support.variant_checkpoints import (
    load_mha_oracle,
    load_noaux_oracle,
    write_mha_checkpoint,
    write_noaux_checkpoint,
)
from tests.support.vl2_checkpoints import TINY_TILE, VL2_VOCAB, wrap_as_vl2

VARIANTS = {
    "noaux_tc": (write_noaux_checkpoint, load_noaux_oracle),
    "mha": (write_mha_checkpoint, load_mha_oracle),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_with_two_cropped_images_match_oracle(tmp_path, variant):
    write, oracle = VARIANTS[variant]
    text = write(tmp_path / "language", seed=5, vocab_size=VL2_VOCAB)
    ckpt = wrap_as_vl2(text, tmp_path / "vl2", seed=5)
    pictures = [  # a wide one (2 x 1 local tiles) and a tall one (1 x 3)
        noise_picture(2 * TINY_TILE + 9, TINY_TILE - 3, seed=1),
        noise_picture(TINY_TILE - 20, 3 * TINY_TILE - 31, seed=2),
    ]
    check_against_oracle(ckpt, oracle, tmp_path / "oracle", pictures)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_with_three_images_no_cropping_match_oracle(tmp_path, variant):
    write, oracle = VARIANTS[variant]
    text = write(tmp_path / "language", seed=6, vocab_size=VL2_VOCAB)
    ckpt = wrap_as_vl2(text, tmp_path / "vl2", seed=6)
    pictures = [noise_picture(150 + 40 * i, 90 + 17 * i, seed=10 + i) for i in range(3)]
    check_against_oracle(ckpt, oracle, tmp_path / "oracle", pictures)
