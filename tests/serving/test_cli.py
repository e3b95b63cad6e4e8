"""`dsv2 model-plane` starts its own local Ray + the model plane, serves, and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc
from services.serving.cli import config_from_args
from services.serving.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_flags_and_config_file_make_one_config(tmp_path):
    import argparse

    from services.serving import cli

    config_file = tmp_path / "plane.yaml"
    config_file.write_text("model_path: /m\nnum_expert_shards: 4\nengine: {block_size: 32}\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--config", str(config_file), "--engine-replicas", "2", "--max-num-seqs", "8"]
    )
    assert config_from_args(args) == {
        "model_path": "/m",
        "num_expert_shards": 4,
        "engine_replicas": 2,
        "engine": {"block_size": 32, "max_num_seqs": 8},
    }


def test_device_and_dtype_flags_are_engine_options(tmp_path):
    import argparse

    from services.serving import cli
    from services.serving.local import reserve_local_gpu

    config_file = tmp_path / "plane.yaml"
    config_file.write_text("model_path: /m\nengine: {dtype: float16, block_size: 32}\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(config_file), "--device", "cuda:0"])
    config = config_from_args(args)
    assert config["engine"] == {"dtype": "float16", "block_size": 32, "device": "cuda:0"}
    # a local run reserves the GPU the engine asks for (Ray hides GPUs otherwise) ...
    assert reserve_local_gpu(config)["engine_deployment"] == {"num_gpus": 1}
    # ... unless the config reserves GPUs itself, and not for an engine on the CPU
    explicit = {**config, "engine_deployment": {"num_gpus": 2}}
    assert reserve_local_gpu(explicit) == explicit
    on_cpu = {"model_path": "/m", "engine": {"device": "cpu"}}
    assert reserve_local_gpu(on_cpu) == on_cpu


def test_shedding_flags_are_engine_options_and_a_negative_bound_is_refused(tmp_path, capsys):
    import argparse

    import pytest

    from services.serving import cli

    parser = argparse.ArgumentParser(prog="dsv2 model-plane")
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--model", "/m", "--max-waiting-requests", "0", "--max-waiting-tokens", "4096"]
    )
    assert config_from_args(args)["engine"] == {
        "max_waiting_requests": 0,
        "max_waiting_tokens": 4096,
    }
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--model", "/m", "--max-waiting-requests", "-1"])
    assert exit_info.value.code == 2
    assert "argument --max-waiting-requests: must be >= 0, got -1" in capsys.readouterr().err


def test_bad_config_is_refused_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "model-plane",
            "--model",
            str(tmp_path),
            "--num-expert-shards",
            "-1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "num_expert_shards" in result.stderr


def test_model_plane_command_serves_until_interrupted(tiny_checkpoint):
    grpc_port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "model-plane",
            "--model",
            str(tiny_checkpoint),
            "--num-expert-shards",
            "2",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(free_port()),
            "--max-num-seqs",
            "4",
            "--dtype",
            "bfloat16",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("model plane ready"):
                ready.set()
        ready.set()  # exited early: fail at once, not after the timeout

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240) and proc.poll() is None, "".join(lines[-30:])
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[5, 6, 7]),
                sampling=pb.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            )
            responses = list(
                stub.Generate(request, metadata=(("application", "dsv2"),), timeout=60)
            )
            info = stub.ModelInfo(
                pb.ModelInfoRequest(), metadata=(("application", "dsv2"),), timeout=30
            )
        assert sum(len(r.token_ids) for r in responses) == 3
        assert info.dtype == "bfloat16"  # the flag reached the Ray Engine replica
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(timeout=60) == 0, "".join(lines[-30:])
        assert time.monotonic() - started < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
