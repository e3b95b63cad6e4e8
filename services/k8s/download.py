"""Fetch a checkpoint from the Hugging Face Hub into a folder (the chart's init container).

    python -m services.k8s.download --repo deepseek-ai/DeepSeek-V2-Lite-Chat --dest /models/x

Reads the token from $HF_TOKEN (gated or private repos). Only what the model plane reads is
fetched (config, safetensors, tokenizer files). A marker file records a finished download of a
revision, so a pod restarting on a persistent volume does not fetch it again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MARKER = ".dsv2-download-complete"
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_complete(dest: Path, repo: str, revision: str) -> bool:
    marker = dest / MARKER
    return marker.is_file() and marker.read_text().strip() == f"{repo}@{revision}"


def download(repo: str, revision: str, dest: Path) -> Path:
    if is_complete(dest, repo, revision):
        print(f"{dest} already holds {repo}@{revision}")
        return dest
    from huggingface_hub import snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    snapshot_download(
        repo_id=repo,
        revision=revision,
        local_dir=dest,
        allow_patterns=PATTERNS,
        token=os.environ.get("HF_TOKEN") or None,
    )
    if not (dest / "config.json").is_file():
        raise SystemExit(f"{repo}@{revision} has no config.json: not a checkpoint")
    (dest / MARKER).write_text(f"{repo}@{revision}\n")
    print(f"downloaded {repo}@{revision} to {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--dest", required=True, type=Path)
    args = parser.parse_args(argv)
    download(args.repo, args.revision, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
