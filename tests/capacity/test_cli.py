"""`dsv2 capacity` as a user runs it: a file and/or flags in, a table or JSON out, and exit
code 2 with the flag named for anything it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.cli import main

EXAMPLE = Path(__file__).parents[2] / "docs" / "capacity-example.yaml"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["capacity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_follows_the_inputs(capsys) -> None:
    code, out, _ = run(capsys, "--config", str(EXAMPLE), "--json")
    assert code == 0
    base = json.loads(out)
    assert base["assumptions"]["daily_users"] == 1_000_000
    # A flag overrides the file: twice the users, twice the turns and Redis load.
    code, out, _ = run(capsys, "--config", str(EXAMPLE), "--json", "--daily-users", "2e6")
    assert code == 0
    double = json.loads(out)
    assert double["plan"]["peak_turns_per_s"] == pytest.approx(2 * base["plan"]["peak_turns_per_s"])
    assert double["plan"]["peak_redis_calls_per_s"] == pytest.approx(
        2 * base["plan"]["peak_redis_calls_per_s"]
    )
    assert double["plan"]["engine_replicas"] > base["plan"]["engine_replicas"]


def test_flags_alone_are_enough(capsys) -> None:
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    argv = []
    for key, value in example.items():
        if key == "tier_mix":
            value = ",".join(f"{tier}={share}" for tier, share in value.items())
        argv += [f"--{key.replace('_', '-')}", str(value)]
    code, from_flags, _ = run(capsys, *argv)
    assert code == 0
    _, from_file, _ = run(capsys, "--config", str(EXAMPLE))
    assert from_flags == from_file
    assert "Engine replicas" in from_file and "GPUs" in from_file


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--daily-users", "-5"], "--daily-users"),
        (["--daily-users", "many"], "--daily-users"),
        (["--cache-hit-rate", "1.5"], "--cache-hit-rate"),
        (["--cache-hit-rate", "-0.1"], "--cache-hit-rate"),
        (["--tier-mix", "free=0.9,pro=0.05"], "--tier-mix"),
        (["--tier-mix", "free"], "--tier-mix"),
        (["--tier-mix", "free=1.2,pro=-0.2"], "--tier-mix"),
        (["--peak-factor", "0.5"], "--peak-factor"),
        (["--reply-tokens", "nan"], "--reply-tokens"),
        (["--gpus-per-engine", "1.5"], "--gpus-per-engine"),
        (["--target-utilization", "0"], "--target-utilization"),
        (["--expert-shards", "-1"], "--expert-shards"),
        (["--expert-shards", "7"], "--expert-shards"),
        (["--model", "no-such-model"], "--model"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(capsys, flags: list[str], names: str) -> None:
    code, out, err = run(capsys, "--config", str(EXAMPLE), *flags)
    assert code == 2
    assert out == ""
    assert err.startswith("dsv2 capacity: error: ") and names in err


def test_missing_measured_figures_are_named(capsys, tmp_path: Path) -> None:
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    del example["decode_tokens_per_s"], example["redis_calls_per_turn"]
    config = tmp_path / "traffic.yaml"
    config.write_text(yaml.safe_dump(example), encoding="utf-8")
    code, out, err = run(capsys, "--config", str(config))
    assert code == 2 and out == ""
    assert "--decode-tokens-per-s" in err and "--redis-calls-per-turn" in err
    assert "--prefill-tokens-per-s" not in err  # only what is missing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("daily_userz: 5\n", "daily_userz"),
        ("- a list\n", "mapping"),
        ("daily_users: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_file_exits_2(capsys, tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text, encoding="utf-8")
    code, _, err = run(capsys, "--config", str(config))
    assert code == 2 and "--config" in err and expected in err


def test_unreadable_config_exits_2(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "--config: cannot read" in err


def test_tier_mix_in_yaml_must_sum_to_one(capsys, tmp_path: Path) -> None:
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    example["tier_mix"] = {"free": 0.5, "pro": 0.4}
    config = tmp_path / "traffic.yaml"
    config.write_text(yaml.safe_dump(example), encoding="utf-8")
    code, _, err = run(capsys, "--config", str(config))
    assert code == 2 and "--tier-mix" in err and "sum to 0.9" in err


def test_help_lists_every_input(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["capacity", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--daily-users", "--cache-hit-rate", "--tier-mix", "--decode-tokens-per-s"):
        assert flag in out
