"""InferenceService: the model-plane API with proto messages in and out."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import Tokenizer
from services.engine import AsyncEngine, Engine, InferenceService, InvalidRequest, SamplingParams
from services.rpc.dsv2.v1 import inference_pb2 as pb


@pytest.fixture
def service(engine_checkpoint: Path):
    engine = AsyncEngine(Engine.from_pretrained(engine_checkpoint, block_size=8))
    yield InferenceService(engine, Tokenizer.from_pretrained(engine_checkpoint), "tiny-dsv2")
    engine.close()


def greedy(max_tokens: int = 8) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


async def run(service: InferenceService, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [r async for r in service.generate(req)]


async def test_chat_messages_are_rendered_with_the_chat_template(service, engine_checkpoint):
    tok = Tokenizer.from_pretrained(engine_checkpoint)
    messages = [
        pb.ChatMessage(role="system", content="You are terse."),
        pb.ChatMessage(role="user", content="What is the capital of France?"),
    ]
    req = pb.GenerateRequest(
        request_id="chat-1", messages=pb.ChatMessages(messages=messages), sampling=greedy()
    )
    responses = await run(service, req)
    rendered = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True
    )
    prompt_ids = tok.encode(rendered)
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == 8
    ids = [t for r in responses for t in r.token_ids]
    offline = Engine.from_pretrained(engine_checkpoint).generate(
        [prompt_ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    assert ids == offline.token_ids
    assert "".join(r.text for r in responses) == offline.text
    tokenized = await service.tokenize(
        pb.TokenizeRequest(messages=pb.ChatMessages(messages=messages))
    )
    assert list(tokenized.token_ids) == prompt_ids and tokenized.num_tokens == len(prompt_ids)


async def test_text_and_token_prompts(service):
    by_text = await run(service, pb.GenerateRequest(text="Hello, world!", sampling=greedy(4)))
    assert sum(len(r.token_ids) for r in by_text) == 4
    by_ids = await run(
        service, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(3))
    )
    assert by_ids[-1].usage.prompt_tokens == 3 and by_ids[-1].usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (pb.GenerateRequest(sampling=greedy()), "set one of"),
        (pb.GenerateRequest(text="", sampling=greedy()), "empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[]), sampling=greedy()), "empty"),
        (pb.GenerateRequest(messages=pb.ChatMessages(), sampling=greedy()), "messages is empty"),
        (
            pb.GenerateRequest(
                messages=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="hi")]),
                sampling=greedy(),
            ),
            "role",
        ),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
        (
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=5, top_p=1.5)),
            "top_p",
        ),
        (  # 0 means "not set" in proto3, a negative value is an error
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=5, top_p=-0.5)),
            "sampling.top_p must be in",
        ),
        (
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=5, temperature=-1)),
            "sampling.temperature",
        ),
        (
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=5, top_k=-1)),
            "sampling.top_k",
        ),
        (
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=5, stop=[""])),
            "sampling.stop must not contain empty strings",
        ),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 2048), sampling=greedy()),
            "context window",
        ),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6]), sampling=greedy()),
            "vocabulary",
        ),
    ],
)
async def test_bad_requests_raise_invalid_request_before_any_work(service, req, message):
    with pytest.raises(InvalidRequest, match=message):
        await run(service, req)
    m = service.engine.metrics
    assert m.prompt_tokens == 0 and m.cache_blocks_used == 0


async def test_model_info_and_health(service):
    info = await service.model_info(pb.ModelInfoRequest())
    assert info.model_id == "tiny-dsv2" and info.max_context_tokens == 2048
    assert info.dtype == "float32" and info.num_expert_shards == 0
    assert info.max_token_bytes == service.tokenizer.max_token_bytes > 0
    health = await service.health(pb.HealthRequest())
    assert health.serving and health.running_requests == 0 and health.waiting_requests == 0


async def test_closing_a_generate_stream_aborts_the_request(service):
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(range(2, 100))),
        sampling=pb.SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True),
    )
    stream = service.generate(req)
    async for _ in stream:
        break
    await stream.aclose()
    assert service.engine.metrics.cache_blocks_used == 0
