"""The engine's device and dtype options: from_pretrained loads onto the device in the dtype
asked for (auto: float32 on the CPU), an engine never silently converts or moves a model,
and bad options fail at start naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import load_pretrained
from model.placement import PlacementError
from services.engine import Engine, EngineOptions, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_auto_is_float32_on_the_cpu_and_the_options_record_the_resolution(engine_checkpoint):
    engine = Engine.from_pretrained(engine_checkpoint)
    if torch.cuda.is_available():
        pytest.skip("auto picks the visible GPU here")
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert (engine.options.device, engine.options.dtype) == ("cpu", "float32")
    assert engine.runner.cache.device == engine.device


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
def test_dtype_by_name_or_torch_dtype(engine_checkpoint, dtype):
    engine = Engine.from_pretrained(engine_checkpoint, dtype=dtype, device="cpu")
    assert engine.dtype == torch.bfloat16 and engine.options.dtype == "bfloat16"
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    assert engine.runner.cache.dtype == torch.bfloat16
    assert len(engine.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 4


def test_weights_load_onto_the_device_given_not_the_default_one(engine_checkpoint: Path):
    # with torch's default device set to meta, a weight created without the device asked
    # for would land on meta (and fail the generation below): loading names its device
    fp32 = Engine.from_pretrained(engine_checkpoint, device="cpu").generate([[5, 6, 7]], GREEDY)
    torch.set_default_device("meta")
    try:
        model = load_pretrained(engine_checkpoint, device="cpu")
    finally:
        torch.set_default_device(None)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    engine = Engine(model, options=EngineOptions(device="cpu"))
    assert engine.generate([[5, 6, 7]], GREEDY)[0].token_ids == fp32[0].token_ids


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"device": "tpu"}, "device='tpu' is not a device: use one of auto, cpu, cuda, cuda:N"),
        ({"dtype": "float8"}, "dtype='float8' is not supported: use one of auto, float32"),
        ({"dtype": torch.float64}, "dtype='float64' is not supported"),
    ],
)
def test_bad_options_fail_before_loading(engine_checkpoint, options, complaint):
    with pytest.raises(PlacementError, match=complaint.replace("(", r"\(")):
        Engine.from_pretrained(engine_checkpoint, **options)


def test_an_engine_never_converts_or_moves_the_model_it_is_given(engine_checkpoint):
    model = load_pretrained(engine_checkpoint, dtype=torch.float32)
    with pytest.raises(PlacementError, match=r"weights are float32 but dtype='bfloat16'"):
        Engine(model, options=EngineOptions(dtype="bfloat16"))
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="no CUDA GPU is visible"):
            Engine(model, options=EngineOptions(device="cuda"))
    # auto takes the model as it is
    engine = Engine(model, options=EngineOptions())
    assert (engine.device.type, engine.dtype) == ("cpu", torch.float32)
