"""`dsv2 generate` prints what the engine generates."""

from __future__ import annotations

import json

from services.cli import main
from services.engine import Engine, SamplingParams


def test_generate_json_with_prompt_ids(engine_checkpoint, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(engine_checkpoint),
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "6",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    expected = Engine.from_pretrained(engine_checkpoint).generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6)
    )[0]
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == expected.text
    assert out["prompt_tokens"] == 3 and out["finish_reason"] == expected.finish_reason


def test_generate_text_prompt_prints_text(engine_checkpoint, capsys):
    rc = main(
        ["generate", "--model", str(engine_checkpoint), "--prompt", "Hello", "--max-tokens", "4"]
    )
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")


def test_bad_input_is_a_clear_error(engine_checkpoint, capsys):
    rc = main(["generate", "--model", str(engine_checkpoint), "--prompt-ids", "1,x"])
    assert rc == 2 and "comma-separated integers" in capsys.readouterr().err
    rc = main(
        ["generate", "--model", str(engine_checkpoint), "--prompt-ids", "5", "--max-tokens", "0"]
    )
    assert rc == 2 and "max_tokens must be > 0" in capsys.readouterr().err


def test_generate_device_and_dtype_flags(engine_checkpoint, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(engine_checkpoint),
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "3",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--json",
        ]
    )
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    rc = main(["generate", "--model", str(engine_checkpoint), "--prompt-ids", "5", "--device", "x"])
    assert rc == 2 and "device='x' is not a device" in capsys.readouterr().err
