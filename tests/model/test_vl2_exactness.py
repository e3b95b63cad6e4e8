"""Whole-model logits with images against an oracle of independent parts (transformers'
SiglipVisionModel, the projector and the 2D layout written from their definitions in
tests/model/vl2_oracle.py, transformers' DeepseekV2ForCausalLM with inputs_embeds):
max |difference| <= 1e-4 in float32 on small random configs. The noaux_tc (V3) and MHA
language models run the same ``check_against_oracle`` with their own oracles."""

from __future__ import annotations

import pytest

from tests.model.vl2_oracle import check_against_oracle, noise_picture
from tests.support.vl2_checkpoints import TINY_TILE, write_random_vl2_checkpoint

LANGUAGE_CASES = {
    # VL2-Small's language model is DeepSeek-V2-Lite's: greedy routing, no q compression
    "v2_lite_like": dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None),
    # the test default: group-limited routing, q compression, YaRN, a dense first layer
    "tiny_default": {},
}


@pytest.mark.parametrize("case", list(LANGUAGE_CASES))
def test_logits_with_two_cropped_images_match_oracle(tmp_path, case):
    from transformers import DeepseekV2ForCausalLM

    ckpt = write_random_vl2_checkpoint(tmp_path / "ckpt", seed=5, **LANGUAGE_CASES[case])
    pictures = [  # a wide one (2 x 1 local tiles) and a tall one (1 x 3)
        noise_picture(2 * TINY_TILE + 9, TINY_TILE - 3, seed=1),
        noise_picture(TINY_TILE - 20, 3 * TINY_TILE - 31, seed=2),
    ]
    check_against_oracle(ckpt, DeepseekV2ForCausalLM, tmp_path / "oracle", pictures)


def test_logits_with_three_images_no_cropping_match_oracle(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    ckpt = write_random_vl2_checkpoint(tmp_path / "ckpt", seed=6, **LANGUAGE_CASES["v2_lite_like"])
    pictures = [noise_picture(150 + 40 * i, 90 + 17 * i, seed=10 + i) for i in range(3)]
    check_against_oracle(ckpt, DeepseekV2ForCausalLM, tmp_path / "oracle", pictures)
