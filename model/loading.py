"""Checkpoint I/O: published safetensors checkpoints in, optional subsets of the weights.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Tensors are read one by one with ``safe_open`` (memory
mapped), so a partial load touches only the bytes of the tensors it needs. The model is built
on the meta device first and each parameter is replaced by the tensor read for it, read
straight onto the target device (safetensors copies each tensor there from the mapped file:
no whole-model copy in host memory on the way to a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from model.config import DeepseekV2Config
from model.moe import RoutedExperts
from model.transformer import DeepseekV2ForCausalLM, ExpertsSpec, moe_layer_indices

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the tensor and the expected shape."""


class SafetensorsCheckpoint:
    """Read-only view of the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.dir = Path(path)
        self.device = torch.device(device)
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        self._handles: dict[str, Any] = {}
        if index.is_file():
            with index.open(encoding="utf-8") as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif single.is_file():
            self.weight_map = {k: SINGLE_FILE for k in self._handle(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.bytes_read = 0  # payload bytes of the tensors read so far

    def _handle(self, filename: str) -> Any:
        if filename not in self._handles:
            file = self.dir / filename
            if not file.is_file():
                raise CheckpointError(f"checkpoint shard {file} is missing")
            self._handles[filename] = safe_open(str(file), framework="pt", device=str(self.device))
        return self._handles[filename]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The tensor ``name`` on this checkpoint's device, checked against ``shape``,
        converted to ``dtype`` (on the device: a GPU converts its own copy)."""
        shape = tuple(shape)
        if name not in self.weight_map:
            raise CheckpointError(
                f"checkpoint {self.dir} has no tensor {name!r} (expected shape {shape})"
            )
        handle = self._handle(self.weight_map[name])
        found = tuple(handle.get_slice(name).get_shape())
        if found != shape:
            raise CheckpointError(
                f"tensor {name!r} in {self.dir} has shape {found}, expected {shape}"
            )
        t = handle.get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t.to(dtype)

    def close(self) -> None:
        self._handles.clear()


def _load_routed(
    ckpt: SafetensorsCheckpoint, experts: RoutedExperts, prefix: str, dtype: torch.dtype
) -> None:
    """Fill a (meta) RoutedExperts from per-expert tensors ``{prefix}{i}.gate_proj.weight``..."""
    inter, hidden, n = experts.intermediate_size, experts.hidden_size, experts.num_experts
    gate_up = torch.empty(n, 2 * inter, hidden, dtype=dtype, device=ckpt.device)
    down = torch.empty(n, hidden, inter, dtype=dtype, device=ckpt.device)
    for local in range(n):
        e = f"{prefix}{experts.start + local}."
        gate_up[local, :inter] = ckpt.read(e + "gate_proj.weight", (inter, hidden), dtype)
        gate_up[local, inter:] = ckpt.read(e + "up_proj.weight", (inter, hidden), dtype)
        down[local] = ckpt.read(e + "down_proj.weight", (hidden, inter), dtype)
    experts.gate_up = nn.Parameter(gate_up)
    experts.down = nn.Parameter(down)


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    experts: ExpertsSpec = "all",
    device: torch.device | str = "cpu",
) -> DeepseekV2ForCausalLM:
    """Build a DeepseekV2ForCausalLM from a checkpoint directory, its weights on ``device``.

    experts: "all"; "none" (no routed expert is built or read: set an expert executor before
    running it); or (start, end): only experts [start, end) of every MoE layer.
    """
    config = DeepseekV2Config.from_pretrained(path)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config, experts)
    ckpt = SafetensorsCheckpoint(path, device)
    try:
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(module, RoutedExperts):
                _load_routed(ckpt, module, prefix, dtype)
                continue
            if module is model.lm_head and config.tie_word_embeddings:
                continue  # tied to embed_tokens, re-tied below
            for pname, param in list(module.named_parameters(recurse=False)):
                t = ckpt.read(prefix + pname, tuple(param.shape), dtype)
                setattr(module, pname, nn.Parameter(t))
    finally:
        ckpt.close()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.bytes_read = ckpt.bytes_read  # type: ignore[attr-defined]  # for memory checks
    return model.eval()


def load_routed_experts(
    path: str | Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[int, RoutedExperts]:
    """Experts [start, end) of every MoE layer (layer index -> RoutedExperts) on ``device``,
    reading only those tensors (what an expert shard holds)."""
    config = DeepseekV2Config.from_pretrained(path)
    n = config.n_routed_experts or 0
    if not 0 <= start < end <= n:
        raise ValueError(f"expert slice [{start}, {end}) is outside [0, {n})")
    ckpt = SafetensorsCheckpoint(path, device)
    out: dict[int, RoutedExperts] = {}
    try:
        for i in moe_layer_indices(config):
            with torch.device("meta"):
                experts = RoutedExperts(
                    config.hidden_size, config.moe_intermediate_size, start, end
                )
            _load_routed(ckpt, experts, f"model.layers.{i}.mlp.experts.", dtype)
            out[i] = experts.eval()
    finally:
        ckpt.close()
    return out


def save_pretrained(
    model: DeepseekV2ForCausalLM,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json + safetensors with the published tensor names (per-expert names for
    routed experts). ``max_shard_bytes`` splits into shards with model.safetensors.index.json."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if dtype is not None:
        config = DeepseekV2Config.from_dict(
            {**config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
        )
    config.save_pretrained(out)
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu", dtype or t.dtype)
        tensors[name] = t.contiguous().clone()  # own storage: safetensors refuses shared views
    if max_shard_bytes is None:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return out
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out
