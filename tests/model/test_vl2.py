"""DeepseekVL2ForCausalLM as the engine and the checkpoint tools see it: text-only use is
exactly the language model's, the engine runs it unchanged, checkpoints round-trip with the
published names, weights land on the device asked for, bad configs name their field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import model
from model.config import ConfigError, DeepseekV2Config
from model.image_processing import process_image
from tests.model.vl2_oracle import noise_picture
from tests.support.vl2_checkpoints import TINY_TILE, write_random_vl2_checkpoint


@pytest.fixture(scope="module")
def vl2_checkpoint(tmp_path_factory) -> Path:
    return write_random_vl2_checkpoint(tmp_path_factory.mktemp("vl2"), seed=11)


def pictures():
    return [
        noise_picture(2 * TINY_TILE + 5, TINY_TILE, seed=3),
        noise_picture(TINY_TILE, 2 * TINY_TILE - 9, seed=4),
    ]


def embed(m, pics, cropping=True):
    return m.embed_images([process_image(p, m.vl2_config.preprocess, cropping) for p in pics])


def tensor_names(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_text_only_is_exactly_the_language_model(vl2_checkpoint):
    vl2 = model.load_pretrained(vl2_checkpoint)
    text = model.load_pretrained(vl2_checkpoint.parent / "language")
    assert isinstance(vl2, model.DeepseekVL2ForCausalLM)
    assert isinstance(text, model.DeepseekV2ForCausalLM)
    assert vl2.config == text.config  # the engine sizes everything from the language config
    ids = torch.randint(
        0, text.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(vl2(ids), text(ids))
        emb = vl2.embed_tokens(ids)
        assert torch.equal(vl2(inputs_embeds=emb), text(ids))


def test_engine_runs_a_vl2_checkpoint_like_its_language_model(vl2_checkpoint):
    from services.engine import Engine, EngineOptions, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[0, 5, 6, 7, 8], [0, 9, 10], [0, 5, 6, 7, 8, 11, 12]]
    options = EngineOptions(block_size=4, max_num_seqs=4)
    got = Engine(model.load_pretrained(vl2_checkpoint), None, options).generate(prompts, greedy)
    text = model.load_pretrained(vl2_checkpoint.parent / "language")
    want = Engine(text, None, options).generate(prompts, greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == 8 for o in got)


def test_packing_for_inference_keeps_images_and_text_the_same(vl2_checkpoint):
    m = model.load_pretrained(vl2_checkpoint)
    ids = torch.arange(1, 25).unsqueeze(0)
    with torch.no_grad():
        before_text, before_images = m(ids), embed(m, pictures())
        m.pack_for_inference()
        after_text, after_images = m(ids), embed(m, pictures())
    assert (before_text - after_text).abs().max().item() <= 1e-5
    for a, b in zip(before_images, after_images, strict=True):
        assert torch.equal(a, b)


def test_save_and_load_round_trip_with_published_names(vl2_checkpoint, tmp_path):
    m = model.load_pretrained(vl2_checkpoint)
    out = model.save_pretrained(m, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_vl_v2"
    assert {"language_config", "vision_config", "projector_config"} <= set(config)
    assert (
        config["candidate_resolutions"]
        == json.loads((vl2_checkpoint / "config.json").read_text())["candidate_resolutions"]
    )
    names = tensor_names(out)
    assert names == tensor_names(vl2_checkpoint)
    assert {
        "image_newline",
        "view_seperator",
        "projector.layers.2.bias",
        "vision.pos_embed",
    } <= names
    assert "vision.blocks.1.attn.qkv.weight" in names
    assert "language.model.layers.1.mlp.experts.0.gate_proj.weight" in names
    again = model.load_pretrained(out)
    for a, b in zip(embed(m, pictures()), embed(again, pictures()), strict=True):
        assert torch.equal(a, b)
    # a text checkpoint still saves as one (no VL2 keys, its own model_type)
    text_out = model.save_pretrained(
        model.load_pretrained(vl2_checkpoint.parent / "language"), tmp_path / "t"
    )
    assert json.loads((text_out / "config.json").read_text())["model_type"] == "deepseek_v2"
    assert not any(n.startswith(("language.", "vision.")) for n in tensor_names(text_out))


def test_half_precision_load_embeds_in_the_model_dtype(vl2_checkpoint):
    m = model.load_pretrained(vl2_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    rows = embed(m, pictures())
    assert all(r.dtype == torch.bfloat16 and r.device.type == "cpu" for r in rows)
    full = embed(model.load_pretrained(vl2_checkpoint), pictures())
    for half, ref in zip(rows, full, strict=True):
        assert (half.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_everything_is_made_on_the_device_asked_for(vl2_checkpoint):
    """Under torch's default device "meta", a tensor made without an explicit device lands
    on meta and the run below fails on it."""
    want_rows = embed(model.load_pretrained(vl2_checkpoint), pictures())
    ids = torch.arange(1, 12)
    with torch.no_grad():
        want_logits = model.load_pretrained(vl2_checkpoint)(ids.unsqueeze(0))
    torch.set_default_device("meta")
    try:
        m = model.load_pretrained(vl2_checkpoint, device="cpu")
        images = [process_image(p, m.vl2_config.preprocess, True) for p in pictures()]
        rows = m.embed_images(images)
        three = m.embed_images(
            [process_image(p, m.vl2_config.preprocess, False) for p in pictures() * 2][:3]
        )
        with torch.no_grad():
            logits = m(inputs_embeds=m.embed_tokens(ids.to("cpu")).unsqueeze(0))
    finally:
        torch.set_default_device(None)
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert all(t.device.type == "cpu" for t in [*rows, *three, logits])
    for got, want in zip(rows, want_rows, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(logits, want_logits)


def test_expert_shards_and_planning_read_the_language_model(vl2_checkpoint):
    language = DeepseekV2Config.from_pretrained(vl2_checkpoint)
    assert language == DeepseekV2Config.from_pretrained(vl2_checkpoint.parent / "language")
    shard = model.load_routed_experts(vl2_checkpoint, 2, 6)
    full = model.load_pretrained(vl2_checkpoint)
    for i, experts in shard.items():
        ref = full.model.layers[i].mlp.experts
        assert torch.equal(experts.gate_up, ref.gate_up[2:6])
        assert torch.equal(experts.down, ref.down[2:6])
    none = model.load_pretrained(vl2_checkpoint, experts="none")
    assert all(moe.experts is None for moe in none.moe_layers())


def test_images_train_end_to_end(vl2_checkpoint):
    """Gradients reach the vision tower, the projector and the layout vectors (a vision
    training stage needs them)."""
    m = model.load_pretrained(vl2_checkpoint).train()
    [rows] = m.embed_images([process_image(pictures()[0], m.vl2_config.preprocess, True)])
    logits = m(inputs_embeds=rows.unsqueeze(0))
    logits.logsumexp(-1).mean().backward()
    for p in (m.vision.patch_embed.proj.weight, m.vision.pos_embed, m.projector.layers[0].weight,
              m.image_newline, m.view_seperator):  # fmt: skip
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_embed_images_refuses_tiles_of_another_layout(vl2_checkpoint):
    m = model.load_pretrained(vl2_checkpoint)
    image = process_image(pictures()[0], m.vl2_config.preprocess, True)
    image.tiles = image.tiles[:2]
    with pytest.raises(ValueError, match="tiles"):
        m.embed_images([image])
    assert m.embed_images([]) == []


def _config(vl2_checkpoint) -> dict:
    return json.loads((vl2_checkpoint / "config.json").read_text())


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda c: c.update(tile_tag="1D"), "tile_tag"),
        (lambda c: c.update(global_view_pos="tail"), "global_view_pos"),
        (lambda c: c.pop("vision_config"), "vision_config"),
        (lambda c: c["projector_config"].update(n_embed=7), "n_embed"),
        (lambda c: c["projector_config"].update(input_dim=7), "input_dim"),
        (lambda c: c["projector_config"].update(projector_type="linear"), "projector_type"),
        (lambda c: c["vision_config"].update(heads=5), "heads"),
        (lambda c: c.update(candidate_resolutions=[[71, 70]]), "candidate_resolutions"),
        (lambda c: c.update(candidate_resolutions=[7]), "candidate_resolutions"),
        (lambda c: c["language_config"].update(hidden_act="relu"), "language_config.*hidden_act"),
    ],
)
def test_bad_config_is_a_clear_error(vl2_checkpoint, tmp_path, edit, names):
    config = _config(vl2_checkpoint)
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=names):
        model.DeepseekVL2Config.from_pretrained(tmp_path)
