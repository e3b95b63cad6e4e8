"""DeepSeek-VL2's conversation format and tokenization around images.

Format (the reference's "deepseek" template):

    <bos>{system}\n\n<|User|>: {user}\n\n<|Assistant|>: {answer}<eos><|User|>: ...\n\n<|Assistant|>:

bos once at the start; the system prompt and its "\n\n" only when there is one; each message
stripped; the prompt ends with "<|Assistant|>:" (no trailing space). User text holds one
"<image>" per attached picture, in order (the README puts them first: "<image>\n{question}").

Tokenization: the text between images is tokenized piece by piece (no BPE merge crosses an
image), and each "<image>" becomes ``num_tokens`` copies of the image token id, the
positions ``DeepseekVL2ForCausalLM.embed_images`` fills.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from model.image_processing import ProcessedImage

IMAGE_PLACEHOLDER = "<image>"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def render_vl2_conversation(
    messages: list[dict[str, Any]], system_prompt: str | None = None
) -> str:
    """The prompt text for ``messages`` ({"role": "user" | "assistant" | "system",
    "content": str}); a leading system message takes the place of ``system_prompt``. Ends
    with the generation prompt "<|Assistant|>:"."""
    system = (system_prompt or "").strip()
    turns = list(messages)
    if turns and isinstance(turns[0], dict) and turns[0].get("role") == "system":
        system = str(turns[0].get("content", "")).strip()
        turns = turns[1:]
    out = [BOS]
    if system:
        out.append(system + "\n\n")
    for i, message in enumerate(turns):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} needs a 'role' and a 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise ValueError(
                f"message {i}: content must be text (with {IMAGE_PLACEHOLDER} per image)"
            )
        if role == "user":
            out.append(f"{USER}: {content.strip()}\n\n")
        elif role == "assistant":
            if IMAGE_PLACEHOLDER in content:
                raise ValueError(f"message {i}: an assistant message cannot carry images")
            out.append(f"{ASSISTANT}: {content.strip()}{EOS}")
        elif role == "system":
            raise ValueError("a system message may only come first")
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (user, assistant or system)")
    out.append(f"{ASSISTANT}:")
    return "".join(out)


def count_images(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def tokenize_with_images(
    tokenizer: _Encoder,
    text: str,
    images: Sequence[ProcessedImage],
    image_token_id: int,
) -> tuple[list[int], list[int]]:
    """(token ids with each "<image>" expanded to that image's ``num_tokens`` copies of
    ``image_token_id``, the start index of each image's run). Special tokens written in the
    text (the bos a rendered conversation begins with) map to their ids."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"the text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but "
            f"{len(images)} images were given: one placeholder per image"
        )
    ids: list[int] = []
    starts: list[int] = []
    for piece, image in zip(pieces, images, strict=False):
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
        starts.append(len(ids))
        ids += [image_token_id] * image.num_tokens
    if pieces[-1]:
        ids += tokenizer.encode(pieces[-1], add_special_tokens=False)
    return ids, starts
