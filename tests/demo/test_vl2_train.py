"""`dsv2 train-demo --recipe vl2`: a smoke run of every stage writes a DeepSeek-VL2 checkpoint
that `model.load_pretrained` reads, the same seed gives the same weights, the training encoder
sees what the chat template renders, and the evaluation backend answers picture questions."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from model import load_pretrained
from model.image_processing import process_image
from model.tokenizer import Tokenizer
from model.vl2 import DeepseekVL2ForCausalLM
from model.vl2_prompt import render_vl2_conversation, tokenize_with_images
from services.cli import main
from services.demo import vl2_corpus
from services.demo.build_tokenizer import EOS, PAD
from services.demo.evaluate import VL2Backend, evaluate_pictures
from services.demo.trainer import IGNORE
from services.demo.vl2_trainer import (
    VL2_RECIPE,
    StageConfig,
    VL2ChatEncoder,
    _accumulate_gradients,
    _chat_stage,
    _reading_head,
    batches,
    recipe_config,
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train(out: Path, seed: int) -> dict[str, torch.Tensor]:
    args = ["train-demo", "--recipe", "vl2", "--out", str(out), "--seed", str(seed)]
    assert main([*args, "--steps", "1", "--batch-size", "2", "--threads", "1", "--no-eval"]) == 0
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl2") / "a"
    train(out, seed=3)
    return out


def test_smoke_run_writes_a_vl2_checkpoint_the_loader_reads(
    smoke: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((smoke / "config.json").read_text())
    assert config["model_type"] == "deepseek_vl_v2"
    assert config["projector_config"]["projector_type"] == "downsample_mlp_gelu"
    assert config["language_config"]["kv_lora_rank"] > 0  # MLA
    assert config["language_config"]["n_routed_experts"] >= 8
    model = load_pretrained(smoke)
    assert isinstance(model, DeepseekVL2ForCausalLM)
    tokenizer = HFTokenizer.from_file(str(smoke / "tokenizer.json"))
    assert model.vl2_config.image_token_id == tokenizer.token_to_id("<image>")
    names = set(load_file(smoke / "model.safetensors"))
    assert {"image_newline", "view_seperator"} <= names
    assert any(n.startswith("vision.") for n in names) and any(
        n.startswith("projector.") for n in names
    )
    stages = json.loads((smoke / "training_args.json").read_text())["stages"]
    assert [s["name"] for s in stages] == [s.name for s in VL2_RECIPE]


def test_same_seed_same_weights_other_seed_other_weights(smoke: Path, tmp_path: Path) -> None:
    first = load_file(smoke / "model.safetensors")
    again = train(tmp_path / "b", seed=3)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = train(tmp_path / "c", seed=4)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_training_encoder_matches_the_chat_template_and_learns_only_replies(smoke: Path) -> None:
    served = Tokenizer.from_pretrained(smoke)
    encoder = VL2ChatEncoder(HFTokenizer.from_file(str(smoke / "tokenizer.json")))
    rng = random.Random(0)
    for _ in range(200):
        sample = vl2_corpus.sample(rng, vl2_corpus.Mix(picture_share=0.0))
        ids, labels = encoder.encode(sample.messages)
        assert ids == served.encode(served.apply_chat_template(sample.messages, False))
        replies = "".join(
            " " + m["content"] + EOS for m in sample.messages if m["role"] == "assistant"
        )
        learned = [t for t in labels if t != IGNORE]
        assert served.decode(learned) == replies
        prompt = sample.messages[:1]
        assert encoder.prompt(prompt) == served.encode(served.apply_chat_template(prompt))
    # pictures: the same ids the engine's image path builds (model.vl2_prompt)
    model = load_pretrained(smoke)
    pre = model.vl2_config.preprocess
    for item in vl2_corpus.held_out_picture_items("number", 4):
        messages = [{"role": "user", "content": item.question}]
        image = process_image(item.image, pre, cropping=True)
        served_ids, starts = tokenize_with_images(
            served, render_vl2_conversation(messages), [image], model.vl2_config.image_token_id
        )
        assert encoder.prompt(messages, [image.num_tokens]) == served_ids
        assert served_ids[starts[0] : starts[0] + image.num_tokens] == (
            [model.vl2_config.image_token_id] * image.num_tokens
        )


def test_picture_positions_are_taught_what_their_image_tokens_show(smoke: Path) -> None:
    """`image_targets`: a number picture's image positions carry the digits of the number its
    reply says (and nothing else), a shapes picture's add up to its count; text positions and
    text rows carry none."""
    tokenizer = HFTokenizer.from_file(str(smoke / "tokenizer.json"))
    config = load_pretrained(smoke).vl2_config
    encoder, pad = VL2ChatEncoder(tokenizer), tokenizer.token_to_id(PAD)
    digit_of = {tokenizer.token_to_id(str(d)): d for d in range(10)}
    mix = vl2_corpus.Mix(picture_share=0.7, count=0.5, number=0.5, problem=0.0)
    batch = next(batches(encoder, config, 7, 16, pad, mix, image_targets=True))
    assert batch.image_targets is not None
    kinds = set()
    for ids, targets, at_images in zip(
        batch.input_ids, batch.targets, batch.image_targets, strict=True
    ):
        is_image = ids == config.image_token_id
        assert (at_images[~is_image] == IGNORE).all()
        reply = tokenizer.decode([t for t in targets.tolist() if t != IGNORE])
        said = [digit_of[t] for t in at_images[is_image].tolist() if t != IGNORE]
        if not is_image.any():
            kinds.add("text")
        elif "number" in reply or "数字" in reply:
            kinds.add("number")
            number = re.search(r"\d+", reply).group()
            assert set(said) == {int(c) for c in number}
        else:
            kinds.add("count")
            count = int(re.search(r"\d+", reply).group())
            # each token's centre count, in both views: twice the shapes
            assert sum(said) == 2 * count
    assert kinds == {"text", "number", "count"}


def test_a_step_in_length_sorted_slices_has_the_whole_batchs_gradient(smoke: Path) -> None:
    """`Batch.split`: a batch's rows come shortest first, so slicing it cuts the short rows'
    padding; each slice keeps its rows' pictures, and a step over the slices (the recipe's
    `micro_batches`) gives the gradient and loss of one pass over the whole batch (the balance
    loss aside: it counts a row's padding as tokens, and a slice pads less)."""
    tokenizer = HFTokenizer.from_file(str(smoke / "tokenizer.json"))
    model = load_pretrained(smoke, dtype=torch.float32).train()
    config = model.vl2_config
    encoder, pad = VL2ChatEncoder(tokenizer), tokenizer.token_to_id(PAD)
    mix = vl2_corpus.Mix(picture_share=0.5, count=0.5, number=0.5, problem=0.0)
    stream = batches(encoder, config, 11, 8, pad, mix, pool_batches=1, image_targets=True)
    batch = next(b for b in stream if b.images and len(set(b.lengths)) > 2)
    assert batch.lengths == sorted(batch.lengths)
    parts = batch.split(3)
    assert sum(p.input_ids.numel() for p in parts) < batch.input_ids.numel()
    for part in parts:
        assert part.input_ids.shape[1] == max(part.lengths)
        image_tokens = int((part.input_ids == config.image_token_id).sum())
        assert image_tokens == sum(image.num_tokens for image in part.images)
    stage = StageConfig("chat", steps=1, lr=1e-3, image_reading_weight=0.5)
    cpu = torch.device("cpu")

    def gradient(pieces: list) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        ce = _accumulate_gradients(model, pieces, stage, cpu)
        return ce, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for layer in model.moe_layers():  # the balance loss counts padded positions too
        layer.config.aux_loss_alpha = 0.0
    whole_ce, whole = gradient([batch])
    sliced_ce, sliced = gradient(parts)
    assert sliced_ce == pytest.approx(whole_ce, rel=1e-5)
    assert len(whole) == len(sliced)
    for a, b in zip(whole, sliced, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_chat_stage_with_the_vision_frozen_trains_only_the_language_side(smoke: Path) -> None:
    """`train_vision=False` (the recipe's chat stage, with its loss at the image positions): the
    tower and projector stay exactly as the reading stage left them while the language model
    learns from picture conversations; afterwards every weight is trainable again."""
    tokenizer = HFTokenizer.from_file(str(smoke / "tokenizer.json"))
    model = load_pretrained(smoke, dtype=torch.float32).train()
    vision = {n: p.detach().clone() for n, p in model.vision.named_parameters()}
    vision |= {f"p.{n}": p.detach().clone() for n, p in model.projector.named_parameters()}
    embed = model.language.model.embed_tokens.weight.detach().clone()
    stage = StageConfig(
        "chat",
        steps=2,
        lr=1e-2,
        batch_size=2,
        mix=vl2_corpus.Mix(picture_share=1.0),
        train_vision=False,
        image_reading_weight=0.5,
    )
    encoder, pad = VL2ChatEncoder(tokenizer), tokenizer.token_to_id(PAD)
    cfg = recipe_config(threads=1)
    _chat_stage(
        model, model.vl2_config, encoder, pad, stage, 0, cfg, torch.device("cpu"), False, []
    )
    after = {n: p for n, p in model.vision.named_parameters()}
    after |= {f"p.{n}": p for n, p in model.projector.named_parameters()}
    assert all(torch.equal(vision[n], after[n]) for n in vision)
    assert not torch.equal(embed, model.language.model.embed_tokens.weight)
    assert all(p.requires_grad for p in model.parameters())


def test_the_reading_classifier_starts_from_its_seed_whatever_ran_before(smoke: Path) -> None:
    """A recipe run stage by stage in separate processes trains the same classifier as one
    process does: its first weights depend on the seed, not on the global generator's past,
    and making it leaves that generator where it was."""
    config = load_pretrained(smoke, dtype=torch.float32).vl2_config
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    first = _reading_head([], config, cpu, seed=5).state_dict()
    torch.manual_seed(2)
    torch.randn(1000)
    before = torch.get_rng_state()
    again = _reading_head([], config, cpu, seed=5).state_dict()
    assert torch.equal(before, torch.get_rng_state())
    other = _reading_head([], config, cpu, seed=6).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_picture_backend_answers_every_question(smoke: Path) -> None:
    model = load_pretrained(smoke)
    backend = VL2Backend(
        model, HFTokenizer.from_file(str(smoke / "tokenizer.json")), max_new_tokens=4
    )
    items = vl2_corpus.held_out_picture_items("number", 3)
    report = evaluate_pictures(backend, items)
    assert report.total == 3 and len(report.failures) == 3 - report.correct


def test_text_recipe_refuses_the_shipped_checkpoint_folder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The shipped folder holds the VL2 model; only the default recipe writes it."""
    assert main(["train-demo", "--recipe", "text", "--steps", "1"]) == 2
    assert "--out" in capsys.readouterr().out


def test_engine_serves_the_vl2_demo_checkpoint_with_the_same_replies(smoke: Path) -> None:
    """The engine's image path (paged cache, spliced image rows) gives the greedy replies the
    training-side backend gives, for pictures and for text."""
    from services.engine import Engine, SamplingParams
    from services.engine.sequence import ImageSpan

    engine = Engine.from_pretrained(smoke)
    tokenizer = Tokenizer.from_pretrained(smoke)
    model = load_pretrained(smoke)
    backend = VL2Backend(
        model, HFTokenizer.from_file(str(smoke / "tokenizer.json")), max_new_tokens=6
    )
    items = vl2_corpus.held_out_picture_items("count", 2)
    conversations = [[{"role": "user", "content": item.question}] for item in items]
    prompts, spans = [], []
    for messages, item in zip(conversations, items, strict=True):
        image = process_image(item.image, model.vl2_config.preprocess, cropping=True)
        ids, starts = tokenize_with_images(
            tokenizer, render_vl2_conversation(messages), [image], model.vl2_config.image_token_id
        )
        prompts.append(ids)
        spans.append([ImageSpan(starts[0], image)])
    params = SamplingParams(temperature=0.0, max_tokens=6)
    served = [out.text for out in engine.generate(prompts, params, images=spans)]
    assert served == backend.replies(conversations, [[item.image] for item in items])
