"""The shipped demo checkpoint: a real DeepSeek-V2-architecture Hugging Face checkpoint that
our model and transformers read alike, and that answers held-out arithmetic correctly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model import DeepseekV2MLP, DeepseekV2MoE, load_pretrained
from model.tokenizer import Tokenizer
from services.demo.evaluate import CausalLMBackend, EngineBackend, EvalReport, evaluate


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_checkpoint_is_a_small_deepseek_v2_with_mla_moe_and_yarn(demo_checkpoint: Path) -> None:
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert config["model_type"] == "deepseek_v2"
    assert config["kv_lora_rank"] > 0 and config["qk_rope_head_dim"] > 0  # MLA
    assert config["n_routed_experts"] >= 8 and config["n_shared_experts"] >= 1
    assert config["first_k_dense_replace"] == 1
    assert config["rope_scaling"]["type"] == "yarn"
    assert (demo_checkpoint / "model.safetensors").stat().st_size < 10 << 20

    model = load_pretrained(demo_checkpoint)
    layers = model.model.layers
    assert isinstance(layers[0].mlp, DeepseekV2MLP)
    assert all(isinstance(layer.mlp, DeepseekV2MoE) for layer in layers[1:])
    with safe_open(demo_checkpoint / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # published names
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in names


def test_transformers_reads_the_checkpoint_and_computes_the_same_logits(
    demo_checkpoint: Path,
) -> None:
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM

    ours = load_pretrained(demo_checkpoint)
    theirs = DeepseekV2ForCausalLM.from_pretrained(demo_checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(demo_checkpoint)
    hf_tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    messages = [{"role": "user", "content": "What is 345 + 278?"}]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def causal_report(demo_checkpoint: Path) -> EvalReport:
    """The held-out set through the model's own full causal pass (the reference answers)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = CausalLMBackend(
        load_pretrained(demo_checkpoint), Tokenizer.from_pretrained(demo_checkpoint)
    )
    started = time.perf_counter()
    report = evaluate(backend)
    print(f"{report.summary()} in {time.perf_counter() - started:.0f} s")
    torch.set_num_threads(previous)
    return report


def test_demo_model_answers_95_percent_of_held_out_arithmetic(causal_report: EvalReport) -> None:
    for item, reply in causal_report.failures:
        print(f"  {item.question!r} -> {reply!r} (expected {item.problem.answer})")
    assert causal_report.total == 200
    assert causal_report.accuracy >= 0.95, causal_report.summary()


def test_engine_gives_the_same_answers(demo_checkpoint: Path, causal_report: EvalReport) -> None:
    from services.engine import Engine

    backend = EngineBackend(
        Engine.from_pretrained(demo_checkpoint), Tokenizer.from_pretrained(demo_checkpoint)
    )
    report = evaluate(backend)
    assert report.replies == causal_report.replies
