"""One request's state inside the engine, and what the engine hands back."""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from services.engine.params import SamplingParams
from services.engine.priority import Priority
from services.engine.text import TextStream

if TYPE_CHECKING:
    from model.image_processing import ProcessedImage


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """One picture in a prompt: its embedding rows replace prompt positions
    [start, start + image.num_tokens), which hold the model's image token id."""

    start: int
    image: ProcessedImage

    @property
    def num_tokens(self) -> int:
        return self.image.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.image.num_tokens

    @cached_property
    def cache_key(self) -> bytes:
        """What decides the image's embedding rows, for prefix-cache keys: its pixels (the
        content hash) and its tiling (the same picture cropped and uncropped shares the
        global view but not the local tiles)."""
        image = self.image
        h = hashlib.blake2b(bytes(image.content_hash), digest_size=16)
        h.update(f"{image.layout.nw}x{image.layout.nh}:{image.num_tokens}".encode())
        return h.digest()


@dataclass
class RequestOutput:
    """Final result of one request of `Engine.generate`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    cached_prompt_tokens: int = 0


@dataclass
class StreamDelta:
    """What one engine step produced for one request (streamed to the caller)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    error: str | None = None


class Sequence:
    """Tokens (prompt + generated), progress, cache blocks and output text of one request.

    Invariant: token_ids[:num_computed] have their latents in the cache; the engine computes
    token_ids[num_computed:] (prefill chunks and decode steps alike) and samples a new token
    when a step reaches the end of token_ids.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        text: TextStream,
        eos_token_id: int | None,
        device: torch.device | str = "cpu",
        *,
        priority: Priority = Priority.FREE,
        images: list[ImageSpan] | None = None,
    ):
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = list(prompt_ids)
        self.params = params
        self.priority = Priority(priority)
        self.text = text
        self.status = SeqStatus.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.cached_prompt_tokens = -1  # set at first scheduling
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_ids.add(eos_token_id)
        # pictures in the prompt, by start; their embeddings [num_tokens, D] by index into
        # `images`, computed when a step first needs them, dropped once the prompt is computed
        self.images: list[ImageSpan] = sorted(images or [], key=lambda span: span.start)
        self.image_ends: list[int] = [span.end for span in self.images]
        self.image_embeds: dict[int, torch.Tensor] = {}
        self.generator: torch.Generator | None = None
        if not params.greedy:
            # on the device the logits are on (multinomial needs its generator there)
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else torch.seed()
            self.generator.manual_seed(seed)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
