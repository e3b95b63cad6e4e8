"""InferenceService with pictures: VL2 prompts, refusals, model info."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from model.tokenizer import Tokenizer
from services.engine import AsyncEngine, Engine, InferenceService, InvalidRequest
from services.rpc.dsv2.v1 import inference_pb2 as pb


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def ask(content: str, *pictures: bytes, max_tokens: int = 4) -> pb.GenerateRequest:
    images = [pb.Image(data=p, mime_type="image/png") for p in pictures]
    return pb.GenerateRequest(
        messages=pb.ChatMessages(
            messages=[pb.ChatMessage(role="user", content=content, images=images)]
        ),
        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )


@pytest.fixture
def text_service(engine_checkpoint: Path):
    engine = AsyncEngine(Engine.from_pretrained(engine_checkpoint, block_size=8))
    yield InferenceService(engine, Tokenizer.from_pretrained(engine_checkpoint), "tiny-dsv2")
    engine.close()


async def test_a_text_only_model_refuses_images_naming_itself(text_service):
    with pytest.raises(InvalidRequest, match="model 'tiny-dsv2' takes no images"):
        [r async for r in text_service.generate(ask("<image>\nWhat is this?", png((255, 0, 0))))]
    m = text_service.engine.metrics
    assert m.prompt_tokens == 0 and m.cache_blocks_used == 0
    info = await text_service.model_info(pb.ModelInfoRequest())
    assert not info.accepts_images and info.max_image_tokens == 0
    # the same text without pictures is an ordinary prompt
    out = [r async for r in text_service.generate(ask("<image>\nWhat is this?"))]
    assert out[-1].usage.completion_tokens == 4
