"""`dsv2 train-demo --recipe text` (the text-only model): a short run writes a checkpoint our
loader reads, with a progress bar, and the same seed gives the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import load_pretrained
from model.tokenizer import Tokenizer
from services.cli import main


def train(out: Path, seed: int) -> dict[str, torch.Tensor]:
    args = ["train-demo", "--recipe", "text", "--out", str(out), "--seed", str(seed)]
    args += ["--steps", "2"]
    assert main([*args, "--batch-size", "4", "--threads", "1", "--no-eval"]) == 0
    return load_file(out / "model.safetensors")


def test_train_demo_is_reproducible_and_writes_a_loadable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = train(tmp_path / "a", seed=3)
    output = capsys.readouterr()
    assert "train-demo" in output.err and "2/2" in output.err  # tqdm progress bar
    assert "trained" in output.out and "stage 1/1" in output.out

    second = train(tmp_path / "b", seed=3)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = train(tmp_path / "c", seed=4)
    assert not all(torch.equal(first[name], other[name]) for name in first)

    model = load_pretrained(tmp_path / "a")
    tokenizer = Tokenizer.from_pretrained(tmp_path / "a")
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([]))])
    assert model(ids).shape == (1, ids.shape[1], tokenizer.vocab_size)


def test_train_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-demo", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().out


def test_train_demo_continues_from_a_checkpoint(tmp_path: Path) -> None:
    import json

    first = train(tmp_path / "a", seed=3)
    args = ["train-demo", "--recipe", "text", "--init-from", str(tmp_path / "a")]
    args += ["--out", str(tmp_path / "b")]
    assert main([*args, "--steps", "1", "--batch-size", "4", "--threads", "1", "--no-eval"]) == 0
    second = load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    assert not all(torch.equal(first[name], second[name]) for name in first)
    stages = json.loads((tmp_path / "b" / "training_args.json").read_text())["stages"]
    assert [stage["steps"] for stage in stages] == [2, 1]
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (
        tmp_path / "a" / "tokenizer.json"
    ).read_bytes()
