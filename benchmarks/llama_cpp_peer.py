"""llama.cpp as a second peer for engine_vs_hf.py: the same checkpoint, its new tokens per second.

llama.cpp is the fastest CPU engine for DeepSeek-V2 we know of, so its ratio to transformers,
measured in the same run, says how much of a target this machine allows at all. It is not a
dependency: point ``--llama-cpp`` at a llama.cpp source tree built with
``cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-batched-bench``.

The random benchmark checkpoint has no tokenizer, so the conversion gives it a plain
sentencepiece-style vocabulary of placeholder pieces (``llama-batched-bench`` feeds random
token ids and never tokenizes text); the weights go through llama.cpp's own converter as
they are.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# Run by the converter's interpreter with argv = [llama.cpp dir, checkpoint, out file, type]:
# llama.cpp's DeepseekV2 converter with set_vocab replaced by a placeholder vocabulary.
_CONVERT = r"""
import json, sys
from pathlib import Path
root, model, out, outtype = sys.argv[1:5]
sys.path[:0] = [root, root + "/gguf-py"]
import gguf
from conversion import deepseek
import convert_hf_to_gguf

def placeholder_vocab(self):
    cfg = json.loads((Path(self.dir_model) / "config.json").read_text())
    n, bos, eos = cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(n)])
    w.add_token_scores([0.0] * n)
    types = [gguf.TokenType.NORMAL] * n
    types[bos] = types[eos] = gguf.TokenType.CONTROL
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)

def parameters_with_q_lora_rank(self):
    # llama.cpp tells a model without q compression (V2-Lite) by its layer count and else
    # requires the key; 0 selects the same uncompressed q path at any depth
    parameters(self)
    if self.hparams.get("q_lora_rank") is None:
        self.gguf_writer.add_q_lora_rank(0)

parameters = deepseek.DeepseekV2Model.set_gguf_parameters
deepseek.DeepseekV2Model.set_gguf_parameters = parameters_with_q_lora_rank
deepseek.DeepseekV2Model.set_vocab = placeholder_vocab
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
convert_hf_to_gguf.main()
"""


def convert(llama_cpp: Path, checkpoint: Path, out: Path, dtype: str) -> Path:
    """checkpoint (HF DeepSeek-V2 dir) -> GGUF at `out`, weights in f32 or bf16 like ours."""
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    subprocess.run(
        [sys.executable, "-c", _CONVERT, str(llama_cpp), str(checkpoint), str(out), outtype],
        check=True,
        capture_output=True,
    )
    return out


def new_tokens_per_second(
    llama_cpp: Path,
    gguf_file: Path,
    threads: int,
    prompt_tokens: int,
    new_tokens: int,
    parallel: list[int],
) -> dict[int, float]:
    """Run llama-batched-bench: {sequences in parallel: generated tokens/s}, counted like
    engine_vs_hf counts ours and transformers': new tokens over the whole run, prompt
    processing included."""
    binary = llama_cpp / "build" / "bin" / "llama-batched-bench"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} not built (see this module's docstring)")
    ctx = max(parallel) * (prompt_tokens + new_tokens)
    proc = subprocess.run(
        [
            str(binary),
            "-m",
            str(gguf_file),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(ctx),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            str(prompt_tokens),
            "-ntg",
            str(new_tokens),
            "-npl",
            ",".join(map(str, parallel)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return parse_batched_bench(proc.stdout)


def parse_batched_bench(table: str) -> dict[int, float]:
    """The markdown table llama-batched-bench prints -> {B: B * TG / T}: new tokens per
    second of the whole run (T = prompt + generation time)."""
    header: list[str] | None = None
    speeds: dict[int, float] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "T s" in cells and "TG" in cells:
            header = cells
        elif header and len(cells) == len(header) and re.fullmatch(r"\d+", cells[0]):
            row = dict(zip(header, cells, strict=True))
            speeds[int(row["B"])] = int(row["B"]) * int(row["TG"]) / float(row["T s"])
    if not speeds:
        raise RuntimeError(f"no results in llama-batched-bench output:\n{table}")
    return speeds
