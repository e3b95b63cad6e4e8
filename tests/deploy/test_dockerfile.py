"""The Dockerfile's invariants, read from the file (Docker cannot run here, so the image is not
built in tests): multi-stage, CUDA base by default with a build argument for CPU, torch pinned
before the rest, protos compiled, non-root runtime user, and a .dockerignore that keeps the
local venv and git history out of the build context."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from tests.deploy.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def _parse() -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, rest
            stages.append(Stage(match.group(1), match.group(2)))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)


def _chain(stages: list[Stage], target: Stage, args: dict[str, str]) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [target]
    while _expand(chain[-1].base, args) in by_name:
        chain.append(by_name[_expand(chain[-1].base, args)])
    return chain


def _user(chain: list[Stage]) -> str | None:
    for stage in chain:
        users = [rest for keyword, rest in stage.instructions if keyword == "USER"]
        if users:
            return users[-1]
    return None


def test_multi_stage_with_a_cuda_default_and_a_cpu_build_argument() -> None:
    args, stages = _parse()
    assert len(stages) >= 3
    assert args["DEVICE"] == "cuda"
    # `FROM base-${DEVICE}` picks the base by build argument; both variants exist.
    names = {s.name for s in stages}
    assert {"base-cuda", "base-cpu", "builder"} <= names
    assert any(s.base == "base-${DEVICE}" for s in stages)
    bases = {s.name: _expand(s.base, args) for s in stages}
    assert bases["base-cuda"].startswith("nvidia/cuda:")
    assert "cuda" not in bases["base-cpu"]
    # The CPU variant installs torch from PyTorch's CPU index.
    cpu_env = " ".join(rest for s in stages if s.name == "base-cpu" for k, rest in s.instructions)
    assert "download.pytorch.org/whl/cpu" in cpu_env


def test_runtime_stage_runs_as_non_root_and_holds_no_build_tools() -> None:
    args, stages = _parse()
    runtime = stages[-1]
    for device in ("cuda", "cpu"):
        chain = _chain(stages, runtime, {**args, "DEVICE": device})
        user = _user(chain)
        assert user is not None and user.split(":")[0] not in ("root", "0"), device
        # Numeric uid, so Kubernetes' runAsNonRoot can verify it; the chart uses the same one.
        assert user.split(":")[0] == "10001"
    copies = [rest for keyword, rest in runtime.instructions if keyword == "COPY"]
    assert copies and all(c.startswith("--from=builder") for c in copies)
    assert not any(keyword == "RUN" and "uv" in rest for keyword, rest in runtime.instructions)


def test_builder_pins_torch_first_installs_the_project_and_compiles_protos() -> None:
    args, stages = _parse()
    (builder,) = [s for s in stages if s.name == "builder"]
    runs = [rest for keyword, rest in builder.instructions if keyword == "RUN"]
    first_install = next(i for i, r in enumerate(runs) if "pip install" in r)
    assert "torch==${TORCH_VERSION}" in runs[first_install]
    assert args["TORCH_VERSION"] == "2.13.0"
    # ... and stays at that exact build while the project's dependencies resolve.
    assert "-r pyproject.toml" in runs[first_install + 1]
    assert '"torch==${TORCH_BUILD}"' in runs[first_install + 1]
    compile_step = next(r for r in runs if "services.rpc.generate" in r)
    assert "--no-deps ." in compile_step
    copied = " ".join(rest for keyword, rest in builder.instructions if keyword == "COPY")
    for path in ("pyproject.toml", "proto", "model", "services"):
        assert path in copied


def test_the_runtime_loads_cpu_kernels_the_builder_compiled() -> None:
    """The runtime stage has no compiler, so the builder builds the C++ CPU kernels of the
    installed package (model/cpu_ext.py) and the runtime points DSV2_CPU_EXT_DIR at them;
    without them every CPU engine pod would run torch's slower kernels."""
    _, stages = _parse()
    (builder,) = [s for s in stages if s.name == "builder"]
    runtime = stages[-1]
    runs = " ".join(rest for keyword, rest in builder.instructions if keyword == "RUN")
    assert "g++" in runs and "ninja-build" in runs
    build = next(r for k, r in builder.instructions if k == "RUN" and "model.cpu_ext" in r)
    assert "DSV2_CPU_EXT_DIR=/opt/dsv2_cpu" in build and "sources.sha256" in build
    assert ("COPY", "--from=builder /opt/dsv2_cpu /opt/dsv2_cpu") in runtime.instructions
    assert ("ENV", "DSV2_CPU_EXT_DIR=/opt/dsv2_cpu") in runtime.instructions
    # the installed package carries the sources the library's digest is checked against
    package_data = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"*.cpp"' in package_data and '"*.h"' in package_data


def test_entrypoint_is_the_dsv2_command() -> None:
    _, stages = _parse()
    entrypoints = [rest for keyword, rest in stages[-1].instructions if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["dsv2"]']


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern == "**" or any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for kept in ("pyproject.toml", "README.md", "proto/dsv2/v1/inference.proto", "services/cli.py"):
        assert not _ignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "deploy/helm/dsv2/Chart.yaml",
    ):
        assert _ignored(dropped, patterns), dropped
