"""Streaming through AsyncEngine: deltas add up to the offline result, cancellation and
refused prompts leave no cache blocks behind, seeded sampling is reproducible."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.engine import AsyncEngine, Engine, InvalidRequest, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def async_engine(engine_checkpoint: Path):
    engine = AsyncEngine(Engine.from_pretrained(engine_checkpoint, block_size=8))
    yield engine
    engine.close()


async def collect(engine: AsyncEngine, rid: str, prompt, params=GREEDY):
    return [d async for d in engine.stream(rid, prompt, params)]


async def test_stream_matches_offline_generate(async_engine, engine_checkpoint):
    # random weights emit random bytes: the text must equal the offline text, piece by piece
    prompts = ["Hello, world! How are you", [5, 6, 7, 8, 9, 10, 11], "你好，世界"]
    results = await asyncio.gather(
        *(collect(async_engine, f"r{i}", p) for i, p in enumerate(prompts))
    )
    offline = Engine.from_pretrained(engine_checkpoint).generate(prompts, GREEDY)
    for deltas, expected in zip(results, offline, strict=True):
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids
        assert "".join(d.text for d in deltas) == expected.text
        assert all(d.finish_reason is None for d in deltas[:-1])
        last = deltas[-1]
        assert last.finish_reason == "length" and last.completion_tokens == 24
    assert async_engine.metrics.cache_blocks_used == 0


async def test_closing_the_stream_cancels_and_frees_blocks_at_once(async_engine):
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    stream = async_engine.stream("cancel-me", list(range(2, 200)), long)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            assert async_engine.metrics.cache_blocks_used > 0
            break
    await stream.aclose()
    m = async_engine.metrics
    assert m.cache_blocks_used == 0 and m.running == 0 and m.waiting == 0
    # the engine keeps serving afterwards
    deltas = await collect(async_engine, "after", [3, 4, 5])
    assert deltas[-1].finish_reason == "length"


async def test_abort_by_id_ends_the_stream_with_abort(async_engine):
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    seen = []
    started = asyncio.Event()

    async def consume():
        async for d in async_engine.stream("victim", [7] * 50, long):
            seen.append(d)
            if len(seen) == 2:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    await async_engine.abort("victim")
    await asyncio.wait_for(task, 5)
    assert seen[-1].finish_reason == "abort"
    assert async_engine.metrics.cache_blocks_used == 0


async def test_over_limit_prompt_is_refused_before_any_work(async_engine):
    limit = async_engine.engine.max_model_len
    with pytest.raises(InvalidRequest, match="shorten the prompt"):
        await collect(async_engine, "huge", [5] * (limit + 1))
    with pytest.raises(InvalidRequest, match="empty"):
        await collect(async_engine, "empty", [])
    with pytest.raises(InvalidRequest, match="max_tokens"):
        await collect(async_engine, "zero", [5], SamplingParams(max_tokens=0))
    m = async_engine.metrics
    assert m.cache_blocks_used == 0 and m.prompt_tokens == 0


async def test_seeded_sampling_is_reproducible_in_any_company(async_engine):
    params = SamplingParams(
        temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True
    )
    alone = await collect(async_engine, "alone", [9, 8, 7, 6], params)
    noise = SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)
    together = await asyncio.gather(
        collect(async_engine, "n1", [1, 2, 3], noise),
        collect(async_engine, "again", [9, 8, 7, 6], params),
        collect(async_engine, "n2", list(range(40)), noise),
    )
    ids = lambda ds: [t for d in ds for t in d.token_ids]  # noqa: E731
    assert ids(together[1]) == ids(alone)
    assert len(set(ids(alone))) > 5
