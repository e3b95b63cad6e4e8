"""Chat messages with pictures -> prompt token ids and image spans, for a DeepSeek-VL2 model.

Each message's image bytes are decoded (model.image_input: formats, byte and pixel limits),
tiled and normalised (model.image_processing; local tiles only when the whole conversation
carries at most two images, as DeepSeek-VL2 was trained), the conversation is rendered in the
VL2 format with one ``<image>`` per picture, and each ``<image>`` becomes its picture's run of
image token ids (model.vl2_prompt). Any problem raises InvalidRequest naming the message.
"""

from __future__ import annotations

from typing import Any

from model.image_input import ImageInputError, decode_image
from model.image_processing import ProcessedImage, process_image
from model.vl2_prompt import IMAGE_PLACEHOLDER, render_vl2_conversation, tokenize_with_images
from services.engine.engine import InvalidRequest
from services.engine.sequence import ImageSpan

# DeepSeek-VL2 tiles pictures only when a conversation carries at most this many
MAX_IMAGES_FOR_CROPPING = 2


def count_images(messages: Any) -> int:
    return sum(len(m.images) for m in messages)


def check_vl2_messages(messages: Any) -> str:
    """Refuse what needs no picture decoded (a placeholder per picture, pictures only in
    user messages, a conversation the VL2 format can render); returns the rendered text."""
    for i, msg in enumerate(messages):
        placeholders = msg.content.count(IMAGE_PLACEHOLDER)
        if placeholders != len(msg.images):
            raise InvalidRequest(
                f"messages[{i}] carries {len(msg.images)} images but its content holds "
                f"{placeholders} {IMAGE_PLACEHOLDER!r} placeholders: put one "
                f"{IMAGE_PLACEHOLDER!r} where each image goes"
            )
        if msg.images and msg.role != "user":
            raise InvalidRequest(
                f"messages[{i}] is a {msg.role} message: only user messages carry images"
            )
    try:
        return render_vl2_conversation([{"role": m.role, "content": m.content} for m in messages])
    except ValueError as e:  # e.g. a system message after the first
        raise InvalidRequest(str(e)) from None


def render_vl2(messages: Any, tokenizer: Any, vl2_config: Any) -> tuple[list[int], list[ImageSpan]]:
    """messages (proto ChatMessage, roles already checked) -> (ids, spans). The cheap checks
    run before any picture is decoded."""
    text = check_vl2_messages(messages)
    cropping = count_images(messages) <= MAX_IMAGES_FOR_CROPPING
    preprocess = vl2_config.preprocess
    images: list[ProcessedImage] = []
    for i, msg in enumerate(messages):
        for j, image in enumerate(msg.images):
            try:
                picture = decode_image(image.data)
            except ImageInputError as e:
                raise InvalidRequest(f"messages[{i}].images[{j}]: {e}") from None
            images.append(process_image(picture, preprocess, cropping))
    try:
        ids, starts = tokenize_with_images(tokenizer, text, images, vl2_config.image_token_id)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    return ids, [ImageSpan(start, image) for start, image in zip(starts, images, strict=True)]
