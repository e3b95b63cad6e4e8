"""`dsv2 serve --no-ray` and `dsv2 gateway --model` build the in-process engine from the
--device/--dtype flags (`--dtype bfloat16` once ran float32: the embedded backend dropped it),
and bad flags stop the command before anything starts."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import torch

from services.gateway.cli import gateway as cli_gateway
from services.launcher import cli_serve


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def _dtype_served(backend) -> str:
    try:
        return asyncio.run(backend.model_info()).dtype
    finally:
        backend.engine.close()  # the AsyncEngine's step thread


def test_serve_no_ray_keeps_the_dtype(tiny_checkpoint):
    args = _serve_args("--no-ray", "--model", str(tiny_checkpoint), "--dtype", "bfloat16")
    with cli_serve._model_plane(args) as backend:
        engine = backend.engine.engine
        assert engine.dtype == torch.bfloat16
        assert engine.model.lm_head.weight.dtype == torch.bfloat16
        assert _dtype_served(backend) == "bfloat16"


def test_serve_no_ray_default_is_auto(tiny_checkpoint):
    args = _serve_args("--no-ray", "--model", str(tiny_checkpoint), "--device", "cpu")
    with cli_serve._model_plane(args) as backend:
        assert _dtype_served(backend) == "float32"  # auto on the CPU


def test_gateway_model_flags_reach_the_engine(tiny_checkpoint):
    parser = argparse.ArgumentParser()
    cli_gateway.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_checkpoint), "--dtype", "bfloat16"])
    backend = cli_gateway.embedded_backend(
        args.model, engine_options=cli_gateway.engine_options_from(args)
    )
    assert _dtype_served(backend) == "bfloat16"


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--device", "tpu"], "error: device='tpu' is not a device"),
        (["--no-ray", "--device", "cuda:7"], "error: device='cuda:7' but"),
    ],
)
def test_serve_refuses_bad_engine_flags_before_starting(tiny_checkpoint, flags, complaint, capsys):
    if "cuda:7" in flags and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = _serve_args("--model", str(tiny_checkpoint), *flags)
    assert cli_serve.run(args) == 2
    err = capsys.readouterr().err
    assert complaint in err


def test_gateway_refuses_bad_engine_flags(tiny_checkpoint, capsys):
    parser = argparse.ArgumentParser()
    cli_gateway.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_checkpoint), "--device", "gpu0"])
    assert cli_gateway.run(args) == 2
    assert "error: device='gpu0' is not a device" in capsys.readouterr().err
    args = parser.parse_args(["--dtype", "bfloat16"])  # no --model: flags without an engine
    assert cli_gateway.run(args) == 2
    assert "--dtype: engine flags need --model" in capsys.readouterr().err
    args = parser.parse_args(["--max-waiting-requests", "3"])
    assert cli_gateway.run(args) == 2
    assert "--max-waiting-requests: engine flags need --model" in capsys.readouterr().err
