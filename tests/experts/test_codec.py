"""Tensors cross the wire as raw little-endian bytes with dtype and shape (no pickle)."""

import pytest
import torch

from services.experts import codec
from services.rpc.dsv2.v1 import experts_pb2


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64]
)
def test_round_trip_keeps_values_dtype_and_shape(dtype):
    tensor = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    message = codec.encode(tensor)
    assert message.dtype == codec.dtype_name(dtype)
    assert list(message.shape) == [3, 5, 7]
    decoded = codec.decode(experts_pb2.Tensor.FromString(message.SerializeToString()))
    assert decoded.dtype == dtype
    assert torch.equal(decoded, tensor)


def test_bytes_are_little_endian_raw_values():
    message = codec.encode(torch.tensor([1, 256], dtype=torch.int32))
    assert message.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    bf16 = codec.encode(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bf16.data == b"\x80\x3f"  # 0x3F80, the upper half of float32 1.0


def test_non_contiguous_and_empty_tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(codec.decode(codec.encode(base.t())), base.t())
    empty = codec.decode(codec.encode(torch.empty(0, 8)))
    assert empty.shape == (0, 8)


def test_bad_messages_raise_clear_errors():
    with pytest.raises(codec.TensorCodecError, match="needs 16"):
        codec.decode(experts_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\x00" * 15))
    with pytest.raises(codec.TensorCodecError, match="unsupported tensor dtype 'complex64'"):
        codec.decode(experts_pb2.Tensor(dtype="complex64", shape=[1], data=b"\x00" * 8))
    with pytest.raises(codec.TensorCodecError, match="unsupported tensor dtype"):
        codec.encode(torch.zeros(2, dtype=torch.bool))
