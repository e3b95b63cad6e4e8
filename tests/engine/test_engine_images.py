"""The engine with pictures, on a small random DeepSeek-VL2: the same greedy tokens as a
plain full forward over inputs_embeds (chunks cutting through images, batched with other
requests), images embedded once per request, preemption, the prefix cache keyed by picture
content, and refusals."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

import model as dsv2
from services.engine import Engine, EngineOptions, InvalidRequest, Priority, SamplingParams
from services.engine.sequence import ImageSpan
from tests.engine.vl2_support import full_forward_greedy, image_prompt, picture

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def oracle(vl2_checkpoint: Path):
    """A model the engine never touches (an engine packs its model for inference)."""
    return dsv2.load_pretrained(vl2_checkpoint)


def engine_for(path: Path, **options) -> Engine:
    return Engine(dsv2.load_pretrained(path), None, EngineOptions(**options))


def requests(m) -> list[tuple[list[int], list[ImageSpan]]]:
    return [
        image_prompt(m, [[0, 5, 6], picture(1), [7, 8, 9]]),  # 27 image tokens (2 x 2 tiles)
        image_prompt(m, [[0, 5, 6], picture(2), [7, 8, 9]]),  # same text, another picture
        ([0, 3, 4, 5, 6, 7, 8, 9, 10], []),  # text only
        # two pictures in one prompt, back to back with one token between
        image_prompt(m, [[0, 5], picture(3, (200, 60)), [11], picture(4, (30, 30)), [7]]),
        image_prompt(m, [[0, 5, 6], picture(1), [7, 8, 9]], cropping=False),  # 13 tokens
    ]


def test_greedy_with_images_matches_the_full_forward(vl2_checkpoint: Path, oracle):
    reqs = requests(oracle)
    want = [full_forward_greedy(oracle, ids, spans, GREEDY.max_tokens) for ids, spans in reqs]
    assert want[0] != want[1]  # the picture matters
    # a 16-token budget: every picture's run is cut across steps (and rows of two requests'
    # images share a step); block size 4 puts image rows in several cache blocks
    engine = engine_for(vl2_checkpoint, block_size=4, max_num_batched_tokens=16)
    out = engine.generate(
        [ids for ids, _ in reqs], GREEDY, images=[spans or None for _, spans in reqs]
    )
    assert [o.token_ids for o in out] == want
    # each picture through the vision tower once, however many chunks it took
    assert engine.runner.images_embedded == sum(len(spans) for _, spans in reqs) == 5
    # the prompt's length counts image tokens
    assert out[0].prompt_token_ids == reqs[0][0] and len(reqs[0][0]) == 3 + 27 + 3


@pytest.mark.parametrize(
    ("when", "image_cache_bytes", "embedded"),
    [("prompt", 0, 1), ("decode", 0, 2), ("decode", 1 << 20, 1)],
)
def test_preempted_requests_keep_or_recompute_their_images(
    vl2_checkpoint: Path, oracle, when, image_cache_bytes, embedded
):
    """A free request preempted by a pro one (one slot) is recomputed from scratch (no
    prefix cache): mid-prompt it keeps its image embeddings; once its prompt is done they
    are freed, and the recompute embeds the picture again, unless the engine's cache of
    recent pictures still holds it. The same tokens every way."""
    ids, spans = requests(oracle)[0]
    want = full_forward_greedy(oracle, ids, spans, GREEDY.max_tokens)
    engine = engine_for(
        vl2_checkpoint,
        block_size=4,
        max_num_seqs=1,
        max_num_batched_tokens=8,
        enable_prefix_caching=False,
        image_cache_bytes=image_cache_bytes,
    )
    engine.add_request(ids, GREEDY, "free", Priority.FREE, images=spans)
    seq = engine.seqs["free"]
    engine.step()
    engine.step()  # 16 of 33 prompt tokens: inside the picture
    assert engine.runner.images_embedded == 1 and seq.image_embeds
    if when == "decode":
        while seq.num_output < 2:
            engine.step()
        assert not seq.image_embeds  # freed once the prompt was computed
    engine.add_request([0, 3, 4, 5], GREEDY, "pro", Priority.PRO)
    while engine.has_unfinished():
        engine.step()
    assert engine.metrics.num_preemptions == 1
    assert seq.finish_reason == "length" and seq.output_ids == want
    assert engine.runner.images_embedded == embedded


def _turn(engine: Engine, ids: list[int], spans: list[ImageSpan], max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    embedded = engine.runner.images_embedded
    computed = engine.metrics.computed_prompt_tokens
    out = engine.generate([ids], params, images=[spans])[0]
    m = engine.metrics
    return (
        out,
        m.ttft_s[-1],
        engine.runner.images_embedded - embedded,
        m.computed_prompt_tokens - computed,
    )


@pytest.mark.parametrize("follow_up", [True, False])
def test_the_same_picture_again_is_served_from_the_caches(vl2_wide_checkpoint: Path, follow_up):
    """The same picture asked about again: the picture's blocks come from the prefix cache,
    the vision tower does not run, and the time to first token is at least 5x shorter
    (medians over five pictures). Either the same question and a follow-up (every picture
    block cached), or a new question: the picture's last rows then share a block with the
    question, which the prefix cache does not hold; the cache of recent pictures supplies
    them."""
    m = dsv2.load_pretrained(vl2_wide_checkpoint)
    engine = Engine(m, None, EngineOptions(block_size=16))
    question = list(range(20, 33))
    again = [*question, 12, 13, 14, 15] if follow_up else list(range(40, 50))
    cold, warm = [], []
    for k in range(5):
        ids, spans = image_prompt(m, [[0, 5, 6], picture(10 + k, (300, 300)), question])
        assert spans[0].num_tokens == 177 and len(ids) == 193  # 3 x 3 tiles dominate
        first, ttft1, embedded1, computed1 = _turn(engine, ids, spans, 4)
        assert first.cached_prompt_tokens == 0 and embedded1 == 1 and computed1 == 193
        second_ids, second_spans = image_prompt(m, [[0, 5, 6], picture(10 + k, (300, 300)), again])
        second, ttft2, embedded2, computed2 = _turn(engine, second_ids, second_spans, 4)
        # full blocks only: 192 (the picture's last block included) or 176 (not)
        cached = 192 if follow_up else 176
        assert second.cached_prompt_tokens == cached and (cached >= spans[0].end) == follow_up
        assert embedded2 == 0 and computed2 == len(second_ids) - cached
        cold.append(ttft1)
        warm.append(ttft2)
    ratio = statistics.median(cold) / statistics.median(warm)
    print(f"time to first token: cold {cold}, cached {warm}: {ratio:.1f}x")
    assert ratio >= 5, f"time to first token {cold} (cold) vs {warm} (cached): {ratio:.1f}x"


def test_another_picture_behind_the_same_text_never_hits(vl2_checkpoint: Path, oracle):
    engine = engine_for(vl2_checkpoint, block_size=4)
    text_before, text_after = [0, 5, 6, 7, 8], [9, 10, 11]
    a_ids, a_spans = image_prompt(oracle, [text_before, picture(1), text_after])
    b_ids, b_spans = image_prompt(oracle, [text_before, picture(2), text_after])
    assert a_ids == b_ids  # the same placeholder ids: only the picture differs
    a = engine.generate([a_ids], GREEDY, images=[a_spans])[0]
    b = engine.generate([b_ids], GREEDY, images=[b_spans])[0]
    assert a.token_ids != b.token_ids
    # only the text block before the picture is shared
    assert b.cached_prompt_tokens == 4 <= b_spans[0].start
    assert b.token_ids == full_forward_greedy(oracle, b_ids, b_spans, GREEDY.max_tokens)
    again = engine.generate([a_ids], GREEDY, images=[a_spans])[0]
    assert again.cached_prompt_tokens == (len(a_ids) - 1) // 4 * 4 >= a_spans[0].end
    assert again.token_ids == a.token_ids


def test_bad_image_requests_are_refused_before_any_work(
    vl2_checkpoint: Path, engine_checkpoint: Path, oracle
):
    ids, spans = requests(oracle)[0]
    text_engine = engine_for(engine_checkpoint)
    with pytest.raises(InvalidRequest, match="this model takes no images"):
        text_engine.add_request([1, 2, 3], GREEDY, images=spans)

    engine = engine_for(vl2_checkpoint, block_size=4, max_model_len=64)
    shifted = [ImageSpan(spans[0].start + 1, spans[0].image)]
    with pytest.raises(InvalidRequest, match="not the image token"):
        engine.add_request(ids, GREEDY, images=shifted)
    with pytest.raises(InvalidRequest, match="holds 27 image tokens but its images cover 0"):
        engine.add_request(ids, GREEDY)
    # image tokens count toward the context: three pictures (81 positions) do not fit 64
    many, many_spans = image_prompt(oracle, [[0], picture(1), picture(2), picture(3), [7]])
    with pytest.raises(InvalidRequest, match="prompt has 83 tokens but the model's context is 64"):
        engine.add_request(many, GREEDY, images=many_spans)
    with pytest.raises(InvalidRequest, match="not the image token"):
        engine.generate([ids, [5, 6]], GREEDY, images=[shifted, None])  # nothing half-queued
    assert not engine.has_unfinished() and engine.metrics.prompt_tokens == 0


def test_image_path_creates_no_tensor_off_its_device(vl2_checkpoint: Path, oracle):
    """As tests/engine/test_device.py: the engine runs on the CPU under
    torch.set_default_device("meta"), so a tensor made without the engine's device (image
    embeddings, the splice, the inputs_embeds step) fails the run."""
    reqs = requests(oracle)
    options = dict(block_size=4, max_num_batched_tokens=16, device="cpu")
    want = [full_forward_greedy(oracle, ids, spans, GREEDY.max_tokens) for ids, spans in reqs]
    m = dsv2.load_pretrained(vl2_checkpoint)  # loaded (and pictures processed) before the trap
    torch.set_default_device("meta")
    try:
        engine = Engine(m, None, EngineOptions(**options))
        got = engine.generate([r[0] for r in reqs], GREEDY, images=[r[1] or None for r in reqs])
        again = engine.generate([r[0] for r in reqs], GREEDY, images=[r[1] or None for r in reqs])
    finally:
        torch.set_default_device(None)
    # the second round runs no picture through the tower: the prefix cache holds their
    # blocks, the cache of recent pictures the rows in a prompt's last, partial block
    assert engine.runner.images_embedded == 5
    assert [o.token_ids for o in got] == want and [o.token_ids for o in again] == want
    assert all(o.cached_prompt_tokens > 0 for o in again)


@pytest.mark.parametrize("value", [-1, 1.5, True, "64MB"])
def test_image_cache_bytes_must_be_a_whole_number(value):
    with pytest.raises(ValueError, match="image_cache_bytes must be a whole number >= 0"):
        EngineOptions(image_cache_bytes=value).validate()
