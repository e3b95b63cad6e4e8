"""Tensor <-> `dsv2.v1.Tensor`: raw little-endian bytes with dtype and shape (never pickle).

bfloat16 has no numpy dtype, so every tensor is reinterpreted as bytes through torch itself;
the only copy on encode is the one into the protobuf `bytes` field.
"""

from __future__ import annotations

import sys

import torch

from services.rpc.dsv2.v1 import experts_pb2

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_BIG_ENDIAN = sys.byteorder == "big"


class TensorCodecError(ValueError):
    """A `Tensor` message that cannot be decoded (unknown dtype, size mismatch)."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TensorCodecError(f"unsupported tensor dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise TensorCodecError(
            f"unsupported tensor dtype {name!r}; expected one of {sorted(_DTYPES)}"
        ) from None


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    if _BIG_ENDIAN and flat.element_size() > 1:
        flat = flat.view(torch.uint8).view(-1, flat.element_size()).flip(1).reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def encode(tensor: torch.Tensor, out: experts_pb2.Tensor | None = None) -> experts_pb2.Tensor:
    """Fill `out` (or a new message) with the tensor's dtype, shape and bytes."""
    message = experts_pb2.Tensor() if out is None else out
    message.dtype = dtype_name(tensor.dtype)
    message.shape[:] = list(tensor.shape)
    message.data = tensor_to_bytes(tensor.cpu())
    return message


def decode(message: experts_pb2.Tensor) -> torch.Tensor:
    """A new CPU tensor owning a copy of the message's bytes."""
    dtype = dtype_from_name(message.dtype)
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape):
        raise TensorCodecError(f"negative dimension in tensor shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype, device="cpu").element_size()
    if len(message.data) != numel * itemsize:
        raise TensorCodecError(
            f"tensor data has {len(message.data)} bytes; shape {shape} of {message.dtype} "
            f"needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device="cpu")
    # bytearray: torch.frombuffer wants a writable buffer, and the tensor must own its memory.
    raw = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    if _BIG_ENDIAN and itemsize > 1:
        raw = raw.view(-1, itemsize).flip(1).reshape(-1).contiguous()
    return raw.view(dtype).reshape(shape)
