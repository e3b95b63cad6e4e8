"""InferenceService with pictures: VL2 prompts, refusals, model info."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from model.tokenizer import Tokenizer
from services.engine import AsyncEngine, Engine, InferenceService, InvalidRequest, SamplingParams
from services.engine.sequence import ImageSpan
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


@pytest.fixture
def vl2_service(vl2_checkpoint: Path):
    engine = AsyncEngine(Engine.from_pretrained(vl2_checkpoint, block_size=4))
    yield InferenceService(engine, Tokenizer.from_pretrained(vl2_checkpoint), "tiny-vl2")
    engine.close()


def expected_prompt(service: InferenceService, texts: list[str], pictures: list[bytes], crop: bool):
    """What the service should send the engine for one user message per text: VL2 format,
    each picture decoded, tiled (cropping as told) and expanded to its image tokens."""
    from model.image_input import decode_image
    from model.image_processing import process_image
    from model.vl2_prompt import render_vl2_conversation, tokenize_with_images

    vl2 = service.engine.engine.model.vl2_config
    images = [process_image(decode_image(p), vl2.preprocess, crop) for p in pictures]
    text = render_vl2_conversation([{"role": "user", "content": t} for t in texts])
    ids, starts = tokenize_with_images(service.tokenizer, text, images, vl2.image_token_id)
    return ids, [ImageSpan(s, im) for s, im in zip(starts, images, strict=True)]


async def test_a_chat_with_a_picture_reaches_the_engine_as_image_tokens(
    vl2_service, vl2_checkpoint
):
    picture = png((200, 30, 30), (120, 60))
    out = [
        r async for r in vl2_service.generate(ask("<image>\nWhat is this?", picture, max_tokens=6))
    ]
    ids, spans = expected_prompt(vl2_service, ["<image>\nWhat is this?"], [picture], crop=True)
    assert spans[0].image.layout.nw * spans[0].image.layout.nh > 1  # cropped: local tiles
    # usage counts every image position as a prompt token
    assert (
        out[-1].usage.prompt_tokens
        == len(ids)
        == len(
            vl2_service.tokenizer.encode(
                "<｜begin▁of▁sentence｜><|User|>: \nWhat is this?\n\n<|Assistant|>:"
            )
        )
        + spans[0].num_tokens
    )
    offline = Engine.from_pretrained(vl2_checkpoint, block_size=4).generate(
        [ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), images=[spans]
    )[0]
    assert [t for r in out for t in r.token_ids] == offline.token_ids
    tokenized = await vl2_service.tokenize(
        pb.TokenizeRequest(messages=ask("<image>\nWhat is this?", picture).messages)
    )
    assert list(tokenized.token_ids) == ids


async def test_three_pictures_in_a_conversation_are_not_cropped(vl2_service):
    pics = [png((200, 30, 30), (120, 60)), png((30, 200, 30), (60, 120)), png((0, 0, 200))]
    req = ask("<image><image>\nAnd <image>?", *pics, max_tokens=2)
    out = [r async for r in vl2_service.generate(req)]
    ids, spans = expected_prompt(vl2_service, ["<image><image>\nAnd <image>?"], pics, crop=False)
    assert all((s.image.layout.nw, s.image.layout.nh) == (1, 1) for s in spans)
    assert out[-1].usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    ("content", "pictures", "message"),
    [
        ("<image>\nWhat is this?", [b"not an image at all"], r"messages\[0\]\.images\[0\]: "),
        ("What is this?", [png((1, 2, 3))], "carries 1 images but its content holds 0"),
        ("<image> and <image>", [png((1, 2, 3))], "carries 1 images but its content holds 2"),
    ],
)
async def test_bad_pictures_are_refused_before_any_work(vl2_service, content, pictures, message):
    with pytest.raises(InvalidRequest, match=message):
        [r async for r in vl2_service.generate(ask(content, *pictures))]
    m = vl2_service.engine.metrics
    assert m.prompt_tokens == 0 and m.cache_blocks_used == 0


async def test_bad_bytes_carry_the_decoders_message(vl2_service):
    from model.image_input import ImageInputError, decode_image

    with pytest.raises(ImageInputError) as decoder:
        decode_image(b"GIF89a broken")
    with pytest.raises(InvalidRequest) as refused:
        [r async for r in vl2_service.generate(ask("<image>", b"GIF89a broken"))]
    assert str(refused.value) == f"messages[0].images[0]: {decoder.value}"


async def test_vl2_model_info(vl2_service):
    info = await vl2_service.model_info(pb.ModelInfoRequest())
    assert info.accepts_images and info.model_id == "tiny-vl2"
    # 56 px tiles, patch 14, downsample 2: h = 2; the largest candidate is 2 x 2 tiles
    assert info.max_image_tokens == 2 * 3 + 1 + 4 * 5 == 27


async def test_image_tokens_count_toward_the_context_window(vl2_checkpoint: Path):
    engine = AsyncEngine(Engine.from_pretrained(vl2_checkpoint, block_size=4, max_model_len=40))
    service = InferenceService(engine, Tokenizer.from_pretrained(vl2_checkpoint), "tiny-vl2")
    try:
        picture = png((200, 30, 30), (120, 60))  # 2 x 1 tiles: 17 image tokens
        with pytest.raises(
            InvalidRequest, match=r"has 51 tokens \(17 of them image tokens\) but the "
        ):
            [r async for r in service.generate(ask("<image>\nWhat is in this picture?", picture))]
        assert engine.metrics.prompt_tokens == 0
    finally:
        engine.close()


async def test_pictures_are_decoded_off_the_event_loop(vl2_service, monkeypatch):
    """Decoding a large upload takes a while: it runs in a worker thread, so the replica's
    event loop keeps streaming other requests. What needs no decoding is refused at once."""
    import threading

    from services.engine import image_prompt

    threads = []

    def recording_decode(data, *args, **kwargs):
        threads.append(threading.get_ident())
        return decode(data, *args, **kwargs)

    decode = image_prompt.decode_image
    monkeypatch.setattr(image_prompt, "decode_image", recording_decode)
    out = [r async for r in vl2_service.generate(ask("<image>\nWhat is this?", png((9, 9, 9))))]
    assert out[-1].usage.completion_tokens == 4
    assert threads and threading.get_ident() not in threads
    tokenized = await vl2_service.tokenize(
        pb.TokenizeRequest(messages=ask("<image>", png((9, 9, 9))).messages)
    )
    assert tokenized.num_tokens > 0 and len(threads) == 2 and threading.get_ident() not in threads
    # a placeholder count that does not match is refused by generate() itself
    with pytest.raises(InvalidRequest, match="holds 0 '<image>' placeholders"):
        vl2_service.generate(ask("no placeholder", png((9, 9, 9))))
    assert len(threads) == 2


async def test_closing_a_stream_with_a_picture_aborts_the_request(vl2_service):
    req = ask("<image>\nWhat is this?", png((9, 90, 9)), max_tokens=1000)
    stream = vl2_service.generate(req)
    async for _ in stream:
        break
    assert vl2_service.engine.metrics.cache_blocks_used > 0
    await stream.aclose()
    m = vl2_service.engine.metrics
    assert m.cache_blocks_used == 0 and m.running == 0
