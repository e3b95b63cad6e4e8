"""Checkpoint I/O: published safetensors checkpoints in, optional subsets of the weights.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Tensors are read one by one with ``safe_open`` (memory
mapped), so a partial load touches only the bytes of the tensors it needs. The model is built
on the meta device first and each parameter is replaced by the tensor read for it, read
straight onto the target device (safetensors copies each tensor there from the mapped file:
no whole-model copy in host memory on the way to a GPU).
"""

from __future__ import annotations

import dataclasses
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
from model.vl2 import (
    IMAGE_TOKEN,
    VL2_MODEL_TYPE,
    DeepseekVL2Config,
    DeepseekVL2ForCausalLM,
    read_model_type,
)

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


def _fill_parameters(
    ckpt: SafetensorsCheckpoint,
    model: nn.Module,
    lm: DeepseekV2ForCausalLM,
    dtype: torch.dtype,
) -> None:
    """Replace every (meta) parameter of ``model`` by the checkpoint tensor of the same name,
    read onto the checkpoint's device; ``lm`` is the language model inside (itself, or
    ``language`` of a VL2 model), whose tied lm_head is re-tied rather than read."""
    tied = lm.config.tie_word_embeddings
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, RoutedExperts):
            _load_routed(ckpt, module, prefix, dtype)
            continue
        if module is lm.lm_head and tied:
            continue  # tied to embed_tokens, re-tied below
        for pname, param in list(module.named_parameters(recurse=False)):
            t = ckpt.read(prefix + pname, tuple(param.shape), dtype)
            setattr(module, pname, nn.Parameter(t))
    if tied:
        lm.lm_head.weight = lm.model.embed_tokens.weight


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    experts: ExpertsSpec = "all",
    device: torch.device | str = "cpu",
) -> DeepseekV2ForCausalLM | DeepseekVL2ForCausalLM:
    """Build the model of a checkpoint directory, its weights on ``device``:
    ``DeepseekVL2ForCausalLM`` when config.json has model_type "deepseek_vl_v2" (a
    DeepSeek-VL2 checkpoint), ``DeepseekV2ForCausalLM`` otherwise.

    experts: "all"; "none" (no routed expert is built or read: set an expert executor before
    running it); or (start, end): only experts [start, end) of every MoE layer.
    """
    model: DeepseekV2ForCausalLM | DeepseekVL2ForCausalLM
    if read_model_type(path) == VL2_MODEL_TYPE:
        vl2_config = DeepseekVL2Config.from_pretrained(path)
        if vl2_config.image_token_id is None:
            vl2_config.image_token_id = image_token_id_from_files(path)
        with torch.device("meta"):
            model = DeepseekVL2ForCausalLM(vl2_config, experts)
        lm = model.language
    else:
        config = DeepseekV2Config.from_pretrained(path)
        with torch.device("meta"):
            model = DeepseekV2ForCausalLM(config, experts)
        lm = model
    ckpt = SafetensorsCheckpoint(path, device)
    try:
        _fill_parameters(ckpt, model, lm, dtype)
    finally:
        ckpt.close()
    model.bytes_read = ckpt.bytes_read  # type: ignore[attr-defined]  # for memory checks
    return model.eval()


def image_token_id_from_files(path: str | Path) -> int | None:
    """The id of the ``<image>`` added token in a checkpoint's tokenizer.json (None when the
    checkpoint has no tokenizer or no such token). Reads the JSON only."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    for token in data.get("added_tokens", []):
        if token.get("content") == IMAGE_TOKEN:
            return int(token["id"])
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and IMAGE_TOKEN in vocab:
        return int(vocab[IMAGE_TOKEN])
    return None


def load_routed_experts(
    path: str | Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[int, RoutedExperts]:
    """Experts [start, end) of every MoE layer (layer index -> RoutedExperts) on ``device``,
    reading only those tensors (what an expert shard holds)."""
    config = DeepseekV2Config.from_pretrained(path)  # a VL2 checkpoint: its language model
    prefix = "language." if read_model_type(path) == VL2_MODEL_TYPE else ""
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
            _load_routed(ckpt, experts, f"{prefix}model.layers.{i}.mlp.experts.", dtype)
            out[i] = experts.eval()
    finally:
        ckpt.close()
    return out


def save_pretrained(
    model: DeepseekV2ForCausalLM | DeepseekVL2ForCausalLM,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json + safetensors with the published tensor names (per-expert names for
    routed experts; ``vision.*``, ``projector.*``, ``image_newline``, ``view_seperator``,
    ``language.*`` for DeepSeek-VL2). ``max_shard_bytes`` splits into shards with
    model.safetensors.index.json."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
    if isinstance(model, DeepseekVL2ForCausalLM):
        vl2 = model.vl2_config
        if dtype_name is not None:
            vl2 = dataclasses.replace(vl2, torch_dtype=dtype_name)
        vl2.save_pretrained(out)
        tied_name = "language.lm_head.weight"
        tied = vl2.language.tie_word_embeddings
    else:
        config = model.config
        if dtype_name is not None:
            config = DeepseekV2Config.from_dict({**config.to_dict(), "torch_dtype": dtype_name})
        config.save_pretrained(out)
        tied_name = "lm_head.weight"
        tied = config.tie_word_embeddings
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if tied and name == tied_name:
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
