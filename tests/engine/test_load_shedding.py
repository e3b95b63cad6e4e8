"""Load shedding on the real (tiny) engine: past the queue bound, new requests of the shed
classes are refused at once with Overloaded while paid classes are still queued; queue depth
per class and shed counts are exported to Prometheus; bad options fail at start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.engine import AsyncEngine, Engine, EngineOptions, Overloaded, Priority
from services.engine.prometheus import register
from services.engine.service import InferenceService
from services.k8s.load import parse_engine_metrics
from services.rpc.dsv2.v1 import inference_pb2 as pb

ENDLESS = pb.SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
SHORT = pb.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def request(rid: str, priority: int, sampling: pb.SamplingParams = SHORT) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
        sampling=sampling,
        priority=priority,
    )


def test_offline_engine_sheds_only_the_configured_classes(engine_checkpoint: Path):
    engine = Engine.from_pretrained(
        engine_checkpoint, max_num_seqs=1, max_waiting_requests=2, shed_priorities=["free", "pro"]
    )
    engine.add_request([1, 2, 3], request_id="a")
    engine.check_overload(Priority.FREE)  # one waiting: under the bound of 2
    engine.add_request([1, 2, 3], request_id="b", priority=Priority.INTERNAL)
    for shed in (Priority.FREE, Priority.PRO):
        with pytest.raises(Overloaded, match=r"2 requests are waiting \(bound 2\)"):
            engine.check_overload(shed)
    engine.check_overload(Priority.INTERNAL)  # never shed here
    m = engine.metrics
    assert m.waiting_by_priority == {"free": 1, "pro": 0, "internal": 1}
    assert m.waiting_tokens_by_priority == {"free": 3, "pro": 0, "internal": 3}
    assert m.shed_by_priority == {"free": 1, "pro": 1, "internal": 0}


def test_token_bound_counts_waiting_prompt_tokens(engine_checkpoint: Path):
    engine = Engine.from_pretrained(engine_checkpoint, max_waiting_tokens=10)
    engine.add_request(list(range(1, 10)), request_id="nine")
    engine.check_overload(Priority.FREE)  # 9 tokens waiting < 10
    engine.add_request([1], request_id="one")
    with pytest.raises(Overloaded, match=r"10 prompt tokens are waiting \(bound 10\)"):
        engine.check_overload(Priority.FREE)


async def test_overloaded_plane_refuses_free_at_once_and_still_serves_pro(engine_checkpoint):
    core = Engine.from_pretrained(
        engine_checkpoint, block_size=8, max_num_seqs=1, max_waiting_requests=1
    )
    async_engine = AsyncEngine(core)
    service = InferenceService(async_engine, core.tokenizer, "tiny")
    registry = CollectorRegistry()
    register(core, registry)

    async def drain(stream) -> list[pb.GenerateResponse]:
        return [r async for r in stream]

    try:
        # An internal request holds the only running slot; a pro request queues behind it.
        hog = service.generate(request("hog", pb.PRIORITY_INTERNAL, ENDLESS))
        first = await anext(hog)
        assert first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
        queued_pro = asyncio.create_task(drain(service.generate(request("pro-1", pb.PRIORITY_PRO))))
        deadline = time.monotonic() + 30
        while core.metrics.waiting_by_priority["pro"] != 1:
            assert time.monotonic() < deadline, "the pro request never queued"
            await asyncio.sleep(0.01)

        # Free (and unspecified, which counts as free) work is refused before any step.
        for rid, priority in (("free-1", pb.PRIORITY_FREE), ("anon", pb.PRIORITY_UNSPECIFIED)):
            started = time.perf_counter()
            with pytest.raises(Overloaded, match="free requests are refused"):
                await anext(service.generate(request(rid, priority)))
            assert time.perf_counter() - started < 1.0
        assert "free-1" not in core.seqs and "anon" not in core.seqs

        # A paid request is still admitted: it queues (two pro waiting now).
        queued_pro_2 = asyncio.create_task(
            drain(service.generate(request("pro-2", pb.PRIORITY_PRO)))
        )
        while core.metrics.waiting_by_priority["pro"] != 2:
            assert time.monotonic() < deadline, "the second pro request never queued"
            await asyncio.sleep(0.01)
        text = generate_latest(registry).decode()
        assert 'dsv2_engine_queue_depth{tier="pro"} 2.0' in text
        assert 'dsv2_engine_queue_depth{tier="free"} 0.0' in text
        assert 'dsv2_engine_queue_tokens{tier="pro"} 8.0' in text
        assert 'dsv2_engine_shed_requests_total{tier="free"} 2.0' in text
        assert 'dsv2_engine_shed_requests_total{tier="pro"} 0.0' in text
        load = parse_engine_metrics([text])  # what `dsv2 k8s status` reads from each pod
        assert load.queue_depth == {"free": 0, "pro": 2, "internal": 0}
        assert load.shed == {"free": 2, "pro": 0, "internal": 0}

        # The hog leaves; both pro requests complete, and free work is taken again.
        await hog.aclose()
        for task in (queued_pro, queued_pro_2):
            out = await asyncio.wait_for(task, 60)
            assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert out[-1].usage.completion_tokens == 4
        out = await drain(service.generate(request("free-2", pb.PRIORITY_FREE)))
        assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        async_engine.close()


async def test_a_burst_between_two_steps_cannot_pass_the_bound(engine_checkpoint):
    """Requests submitted but not yet taken by the step thread count as waiting: of a burst
    of five free requests against a bound of two, exactly two are queued and three refused."""
    core = Engine.from_pretrained(
        engine_checkpoint, block_size=8, max_num_seqs=1, max_waiting_requests=2
    )
    async_engine = AsyncEngine(core)
    service = InferenceService(async_engine, core.tokenizer, "tiny")
    hog = service.generate(request("hog", pb.PRIORITY_INTERNAL, ENDLESS))
    streams = []
    try:
        await anext(hog)  # the only running slot is taken: every free request must wait
        streams = [service.generate(request(f"free-{i}", pb.PRIORITY_FREE)) for i in range(5)]
        firsts = await asyncio.gather(
            *(asyncio.wait_for(anext(s), 0.5) for s in streams), return_exceptions=True
        )
        # The first two are queued: still waiting, or (on a CPU fast enough that the hog hits
        # the model's length limit within the wait) already streaming; never refused.
        refused = [isinstance(r, Overloaded) for r in firsts]
        assert refused == [False, False, True, True, True], firsts
        assert all(isinstance(r, pb.GenerateResponse | TimeoutError) for r in firsts[:2])
        assert core.metrics.shed_by_priority["free"] == 3
    finally:
        # closed here, not after the asserts: a stream left open when one fails would keep
        # the event loop's shutdown waiting on it and hang the whole session
        for stream in (hog, *streams):
            await stream.aclose()
        async_engine.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_waiting_requests": -1}, "max_waiting_requests must be >= 0"),
        ({"max_waiting_tokens": -5}, "max_waiting_tokens must be >= 0"),
        ({"max_waiting_requests": 2.5}, "max_waiting_requests must be a whole number"),
        ({"shed_priorities": ["free", "gold"]}, "shed_priorities: unknown priority 'gold'"),
        ({"shed_priorities": "free"}, "shed_priorities must be a list"),
        ({"priority_aging_s": 0}, "priority_aging_s must be > 0"),
        ({"priority_aging_s": float("nan")}, "priority_aging_s must be > 0"),
    ],
)
def test_bad_shedding_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(**options).validate()


def test_unknown_priority_on_the_wire_is_invalid_input(engine_checkpoint: Path):
    from services.engine import InvalidRequest

    core = Engine.from_pretrained(engine_checkpoint)
    service = InferenceService(AsyncEngine(core), core.tokenizer, "tiny")
    with pytest.raises(InvalidRequest, match="priority 9 is not a known class"):
        service.generate(request("x", 9))
