"""docs/capacity.md shows `dsv2 capacity` output; every such block must be exactly what the
command prints today, so the worked example cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from services.cli import main

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "capacity.md"
# A fenced block whose first line is `$ dsv2 capacity ...`; the rest is its output.
BLOCK = re.compile(r"```text\n\$ dsv2 (capacity [^\n]*)\n(.*?)```", re.DOTALL)


def test_doc_examples_equal_the_commands_output(capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the doc's paths are relative to the repository root
    blocks = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert blocks, "docs/capacity.md has no `$ dsv2 capacity` example"
    for command, shown in blocks:
        assert main(shlex.split(command)) == 0
        printed = capsys.readouterr().out
        assert shown == printed, (
            f"docs/capacity.md is stale: run `dsv2 {command}` and paste its output"
        )


def test_worked_example_is_one_million_daily_users() -> None:
    (command, shown), *_ = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert command == "capacity --config docs/capacity-example.yaml"
    example = yaml.safe_load((ROOT / "docs" / "capacity-example.yaml").read_text("utf-8"))
    assert example["daily_users"] == 1_000_000
    assert "1M users × 10" in shown
    assert re.search(r"Engine replicas\s+\d+", shown) and re.search(r"GPUs\s+\d+", shown)


def test_readme_links_the_page() -> None:
    assert "docs/capacity.md" in (ROOT / "README.md").read_text(encoding="utf-8")
