"""Pictures in prompts, host side: span checks, prefix-cache keys, which step rows an image
fills (chunks cutting through images included)."""

from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.images import check_spans, image_rows
from services.engine.params import SamplingParams
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import ImageSpan, Sequence
from services.engine.step_inputs import pack_batch
from services.engine.text import TextStream
from tests.engine.image_support import picture

IMG = 99  # the image token id of these tests


def prompt(*parts: int | list[int]) -> tuple[list[int], list[int]]:
    """Token ids from text ids (lists) and image runs (ints: that many image tokens); and
    each image's start."""
    ids: list[int] = []
    starts: list[int] = []
    for part in parts:
        if isinstance(part, int):
            starts.append(len(ids))
            ids.extend([IMG] * part)
        else:
            ids.extend(part)
    return ids, starts


def seq_with(ids: list[int], spans: list[ImageSpan], rid: str = "r") -> Sequence:
    return Sequence(
        rid, ids, SamplingParams(temperature=0), TextStream(None, []), None, images=spans
    )


def test_spans_must_cover_exactly_the_image_token_runs():
    ids, (a, b) = prompt([1, 2], 5, [3], 4, [6])
    good = [ImageSpan(a, picture(5, "a")), ImageSpan(b, picture(4, "b"))]
    check_spans(ids, good, IMG)
    check_spans(ids, list(reversed(good)), IMG)  # any order
    cases = {
        "spans prompt positions [10, 15) but the prompt has 13 tokens": [
            ImageSpan(a, picture(5, "a")),
            ImageSpan(10, picture(5, "b")),
        ],
        "holds token 3, not the image token 99": [
            ImageSpan(a, picture(6, "a")),
            ImageSpan(b, picture(4, "b")),
        ],
        "the prompt holds 9 image tokens but its images cover 5": [ImageSpan(a, picture(5, "a"))],
        "inside the image before it": [
            ImageSpan(a, picture(5, "a")),
            ImageSpan(a + 2, picture(2, "b")),
        ],
        "spans prompt positions [-1, 4)": [
            ImageSpan(-1, picture(5, "a")),
            ImageSpan(b, picture(4, "b")),
        ],
    }
    for message, spans in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
            check_spans(ids, spans, IMG)


def committed(bm: BlockManager, s: Sequence) -> None:
    assert bm.ensure_slots(s, len(s.token_ids))
    s.num_computed = len(s.token_ids)
    bm.commit_full_blocks(s)


def test_prefix_cache_keys_images_by_content_not_placeholder_ids():
    # block size 4: [bos t t IMG] [IMG x4] [IMG x4] [IMG t t t] [t]
    ids, (start,) = prompt([0, 5, 6], 10, [7, 8, 9, 10])
    bm = BlockManager(num_blocks=64, block_size=4)
    first = seq_with(ids, [ImageSpan(start, picture(10, "cat"))], "first")
    committed(bm, first)

    same = seq_with(ids, [ImageSpan(start, picture(10, "cat"))], "same")
    assert bm.match_prefix(same) == 16  # every full block (the last token is left to compute)

    other = seq_with(ids, [ImageSpan(start, picture(10, "dog"))], "other")
    assert bm.match_prefix(other) == 0  # the first block already holds an image position

    # the same picture tiled differently (cropping off) has other local-tile rows
    uncropped = seq_with(ids, [ImageSpan(start, picture(10, "cat", layout=(1, 1)))], "tiles")
    assert bm.match_prefix(uncropped) == 0

    # text before the image still hits when the picture differs
    ids2, (start2,) = prompt([0, 5, 6, 7], 8, [1])
    bm2 = BlockManager(num_blocks=64, block_size=4)
    committed(bm2, seq_with(ids2, [ImageSpan(start2, picture(8, "cat"))], "a"))
    assert bm2.match_prefix(seq_with(ids2, [ImageSpan(start2, picture(8, "dog"))], "b")) == 4


def test_image_offset_is_part_of_the_key():
    # two images of the same picture back to back vs. one picture then another: the second
    # run's blocks see the same placeholder ids and the same first picture, but not the same
    # offsets/contents
    ids, (a, b) = prompt(4, 4, [1])
    bm = BlockManager(num_blocks=64, block_size=4)
    committed(bm, seq_with(ids, [ImageSpan(a, picture(4, "x")), ImageSpan(b, picture(4, "x"))]))
    both_x = seq_with(ids, [ImageSpan(a, picture(4, "x")), ImageSpan(b, picture(4, "x"))], "2")
    assert bm.match_prefix(both_x) == 8
    x_then_y = seq_with(ids, [ImageSpan(a, picture(4, "x")), ImageSpan(b, picture(4, "y"))], "3")
    assert bm.match_prefix(x_then_y) == 4
    # one 8-token picture: positions 4..7 are its rows 4..7, not a second image's rows 0..3
    one = seq_with(ids, [ImageSpan(a, picture(8, "x"))], "4")
    assert bm.match_prefix(one) == 0


def test_text_blocks_hash_as_before():
    from services.engine.block_manager import block_hash

    s = seq_with([1, 2, 3, 4, 5], [])
    bm = BlockManager(num_blocks=8, block_size=4)
    committed(bm, s)
    assert s.block_hashes == [block_hash(b"", [1, 2, 3, 4])]


def test_chunks_cutting_through_images_fill_the_right_rows():
    ids, (a, b) = prompt([1, 2], 5, [3], 4, [6])  # images at [2, 7) and [8, 12)
    s = seq_with(ids, [ImageSpan(a, picture(5, "a")), ImageSpan(b, picture(4, "b"))])
    rows = image_rows(s, first_row=10, start=4, end=10)  # positions 4..9
    assert [(r.row, r.index, r.offset, r.n) for r in rows] == [(10, 0, 2, 3), (14, 1, 0, 2)]
    assert image_rows(s, 0, 0, 2) == [] and image_rows(s, 0, 12, 13) == []

    # in a step: a one-token prompt chunk on an image row, and a prefill chunk after it
    s.num_computed, s.block_table = 3, [0, 1, 2, 3]
    t = seq_with(ids, [ImageSpan(a, picture(5, "c")), ImageSpan(b, picture(4, "d"))], "t")
    t.num_computed, t.block_table = 6, [4, 5, 6, 7]
    packed = pack_batch(ScheduledBatch(decodes=[s], prefills=[(t, 4)]), block_size=4)
    got = [(r.row, r.seq.request_id, r.index, r.offset, r.n) for r in packed.image_rows]
    # row 0 = s's position 3 (image 0 row 1); rows 1.. = t's positions 6..9
    assert got == [(0, "r", 0, 1, 1), (1, "t", 0, 4, 1), (3, "t", 1, 0, 2)]
    assert not packed.decode_only

    text = seq_with([1, 2, 3], [], "text")
    text.block_table = [0]
    assert pack_batch(ScheduledBatch(prefills=[(text, 3)]), 4).image_rows == []


def test_embedding_cache_keeps_recent_pictures_within_its_bytes():
    import torch

    from services.engine.images import EmbeddingCache

    rows = {k: torch.full((4, 8), float(i)) for i, k in enumerate([b"a", b"b", b"c"])}  # 128 B
    cache = EmbeddingCache(max_bytes=256)
    cache.put(b"a", rows[b"a"])
    cache.put(b"b", rows[b"b"])
    assert cache.get(b"a") is rows[b"a"]  # a is now the most recent
    cache.put(b"c", rows[b"c"])  # over budget: b, the least recently used, goes
    assert cache.get(b"b") is None and cache.get(b"a") is rows[b"a"] and len(cache) == 2
    assert cache.bytes == 256
    cache.put(b"big", torch.zeros(16, 8))  # larger than the whole budget: not kept
    assert cache.get(b"big") is None and len(cache) == 2
    off = EmbeddingCache(max_bytes=0)
    off.put(b"a", rows[b"a"])
    assert off.get(b"a") is None and off.bytes == 0
