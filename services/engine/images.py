"""Pictures in a prompt: checking their spans, their part of the prefix-cache keys, which
rows of a step they fill, and their embeddings (computed once per request).

A prompt with images holds the model's image token id at every position an image takes
(``ImageSpan``); the runner replaces those rows' token embeddings with the image's embedding
rows. Every image token is an ordinary prompt position: it takes cache slots, counts toward
the context limit and is keyed in the prefix cache, by the picture's content hash as well as
the token ids (the ids are the same placeholder for every picture).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.engine.sequence import ImageSpan, Sequence

if TYPE_CHECKING:
    from torch import Tensor, nn


def check_spans(ids: list[int], spans: list[ImageSpan], image_token_id: int) -> None:
    """Raise ValueError (saying what is wrong) unless the spans lie inside the prompt, do not
    overlap, and cover exactly the positions that hold the image token id."""
    covered = 0
    prev_end = 0
    for i, span in enumerate(sorted(spans, key=lambda s: s.start)):
        n = span.num_tokens
        if n <= 0:
            raise ValueError(f"image {i} takes {n} tokens: an image takes at least one")
        if span.start < 0 or span.end > len(ids):
            raise ValueError(
                f"image {i} spans prompt positions [{span.start}, {span.end}) but the prompt "
                f"has {len(ids)} tokens"
            )
        if span.start < prev_end:
            raise ValueError(f"image {i} starts at {span.start}, inside the image before it")
        bad = next((p for p in range(span.start, span.end) if ids[p] != image_token_id), None)
        if bad is not None:
            raise ValueError(
                f"image {i} spans [{span.start}, {span.end}) but prompt position {bad} holds "
                f"token {ids[bad]}, not the image token {image_token_id}: expand each <image> "
                "to the image's num_tokens copies of the image token"
            )
        covered += n
        prev_end = span.end
    total = ids.count(image_token_id)
    if total != covered:
        raise ValueError(
            f"the prompt holds {total} image tokens but its images cover {covered}: every "
            "image token must belong to an attached image"
        )


def block_image_key(seq: Sequence, lo: int, hi: int) -> bytes:
    """The images' part of the prefix-cache key of prompt positions [lo, hi): for each image
    overlapping them, where it starts in the block, the offset into the image and its key.
    Empty for a block without images, so text blocks hash as before."""
    spans = seq.images
    if not spans:
        return b""
    parts: list[bytes] = []
    for k in range(bisect_right(seq.image_ends, lo), len(spans)):
        span = spans[k]
        if span.start >= hi:
            break
        first = max(span.start, lo)
        parts.append(f"{first - lo}:{first - span.start}:".encode() + span.cache_key)
    return b"|".join(parts)


@dataclass(frozen=True)
class ImageRows:
    """Rows [row, row + n) of a step take rows [offset, offset + n) of image `index`'s
    embedding of sequence `seq`."""

    row: int
    seq: Sequence
    index: int
    offset: int
    n: int


def image_rows(seq: Sequence, first_row: int, start: int, end: int) -> list[ImageRows]:
    """The image rows of a chunk computing seq's positions [start, end) from row first_row."""
    out: list[ImageRows] = []
    spans = seq.images
    for k in range(bisect_right(seq.image_ends, start), len(spans)):
        span = spans[k]
        if span.start >= end:
            break
        lo, hi = max(span.start, start), min(span.end, end)
        out.append(ImageRows(first_row + lo - start, seq, k, lo - span.start, hi - lo))
    return out


class EmbeddingCache:
    """Embeddings of recently seen pictures by ``ImageSpan.cache_key``, least recently used
    dropped first, at most ``max_bytes`` in all (0: keeps nothing). A prompt's last rows are
    never in the prefix cache (it holds full blocks only), so a picture asked about again
    with a new question would otherwise run the vision tower again for those few rows."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._rows: OrderedDict[bytes, Tensor] = OrderedDict()

    def get(self, key: bytes) -> Tensor | None:
        rows = self._rows.get(key)
        if rows is not None:
            self._rows.move_to_end(key)
        return rows

    def put(self, key: bytes, rows: Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if size > self.max_bytes or key in self._rows:
            return
        self._rows[key] = rows
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._rows)


def ensure_embeddings(model: nn.Module, rows: list[ImageRows], cache: EmbeddingCache) -> int:
    """Make sure every image the step's sequences still need (those ending past what each
    has computed) has its embedding on the sequence: from the cache, or computed, in one
    call for the whole step. A request's images are thus embedded at most once, at its first
    chunk that touches one; its later chunks, and a recompute after preemption during its
    prompt, reuse them. Returns the number of images run through the vision tower."""
    todo: list[tuple[Sequence, int]] = []
    seen: set[int] = set()
    for r in rows:
        seq = r.seq
        if id(seq) in seen:
            continue
        seen.add(id(seq))
        for k in range(bisect_right(seq.image_ends, seq.num_computed), len(seq.images)):
            if k in seq.image_embeds:
                continue
            cached = cache.get(seq.images[k].cache_key)
            if cached is not None:
                seq.image_embeds[k] = cached
            else:
                todo.append((seq, k))
    if not todo:
        return 0
    embeds = model.embed_images([seq.images[k].image for seq, k in todo])
    for (seq, k), e in zip(todo, embeds, strict=True):
        want = seq.images[k].num_tokens
        if e.shape[0] != want:
            raise RuntimeError(f"image embedding has {e.shape[0]} rows, its span {want}")
        seq.image_embeds[k] = e
        cache.put(seq.images[k].cache_key, e)
    return len(todo)


def splice(token_embeds: Tensor, rows: list[ImageRows]) -> Tensor:
    """token_embeds [T, D] with the image rows replaced by the images' embedding rows."""
    for r in rows:
        src = r.seq.image_embeds[r.index][r.offset : r.offset + r.n]  # [n, D]
        token_embeds[r.row : r.row + r.n] = src.to(token_embeds.dtype)
    return token_embeds


def release(seq: Sequence) -> None:
    """Drop seq's image embeddings once its prompt is computed (decode never needs them; a
    recompute after a later preemption embeds again what the prefix cache no longer holds)."""
    if seq.image_embeds and seq.num_computed >= seq.prompt_len:
        seq.image_embeds.clear()
