"""RemoteExpertExecutor against real shard servers over gRPC on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import REGISTRY, generate_latest

import model
from services.engine import AsyncEngine, Engine, SamplingParams
from services.experts import ExpertShardError, ThreadedShardServer
from services.rpc.dsv2.v1 import experts_pb2, experts_pb2_grpc
from tests.experts.greedy import MIXED_MAX_TOKENS, MIXED_PROMPTS, assert_same_up_to_ties


@pytest.fixture(scope="module")
def full_model(tiny_checkpoint: Path) -> model.DeepseekV2ForCausalLM:
    return model.load_pretrained(tiny_checkpoint).eval()


@pytest.mark.parametrize("num_shards", [2, 4])
def test_greedy_outputs_match_in_process_engine(
    num_shards, tiny_checkpoint, full_model, remote_executor
):
    executor, _ = remote_executor(num_shards)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MIXED_MAX_TOKENS
    ]
    local = Engine.from_pretrained(tiny_checkpoint, max_num_seqs=4, block_size=8)
    remote = Engine.from_pretrained(
        tiny_checkpoint, experts="none", expert_executor=executor, max_num_seqs=4, block_size=8
    )
    expected = [o.token_ids for o in local.generate(MIXED_PROMPTS, params)]
    actual = [o.token_ids for o in remote.generate(MIXED_PROMPTS, params)]
    assert [len(t) for t in actual] == MIXED_MAX_TOKENS
    assert_same_up_to_ties(full_model, MIXED_PROMPTS, expected, actual)
    # The engine really went through the shards, every one of them.
    assert all(n > 0 for n in executor.traffic.exchanges)

    # Full-sequence logits agree too (a batch with padding-free equal lengths).
    remote_model = model.load_pretrained(tiny_checkpoint, experts="none")
    remote_model.set_expert_executor(executor)
    ids = torch.tensor([MIXED_PROMPTS[1][:20], MIXED_PROMPTS[5][:20]])
    with torch.inference_mode():
        torch.testing.assert_close(remote_model(ids), full_model(ids), atol=1e-5, rtol=1e-5)


def test_group_limited_routing_reaches_at_most_topk_group_shards(
    tiny_checkpoint, tiny_config, remote_executor
):
    assert (tiny_config["n_group"], tiny_config["topk_group"]) == (4, 2)
    executor, _ = remote_executor(4)
    engine = Engine.from_pretrained(tiny_checkpoint, experts="none", expert_executor=executor)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.generate(MIXED_PROMPTS, params)
    traffic = executor.traffic.snapshot()
    dispatched = sum(traffic["shards_per_token"])
    moe_layers = len(
        model.moe_layer_indices(model.DeepseekV2Config.from_pretrained(tiny_checkpoint))
    )
    prompt_tokens = sum(len(p) for p in MIXED_PROMPTS)
    # every prompt token and every generated token but the last went through every MoE layer
    assert dispatched == moe_layers * (prompt_tokens + len(MIXED_PROMPTS) * 7)
    assert traffic["max_shards_per_token"] <= 2
    # per-expert load: K choices per token per layer
    k = tiny_config["num_experts_per_tok"]
    for counts in traffic["expert_tokens"].values():
        assert sum(counts) == k * dispatched // moe_layers
    assert sum(traffic["bytes_sent"]) > 0

    # The counter does count more shards when routing spreads a token wider.
    hidden = torch.randn(2, tiny_config["hidden_size"])
    ids = torch.tensor([[0, 7], [2, 4]])  # shards {0, 3} and {1, 2}
    executor.start(1, hidden, ids, torch.ones(2, 2)).wait()
    assert executor.traffic.shards_per_token[2] >= 2

    text = generate_latest(REGISTRY).decode()
    assert 'dsv2_expert_tokens_total{expert="0",layer="1"}' in text
    assert "dsv2_expert_bytes_sent_total" in text


def test_partial_sums_add_up_to_the_layer(tiny_checkpoint, tiny_config, remote_executor):
    """Each shard gets only its rows; the sum over shards equals all experts in one place."""
    executor, servers = remote_executor(4)
    everything = model.load_routed_experts(tiny_checkpoint, 0, tiny_config["n_routed_experts"])
    torch.manual_seed(0)
    hidden = torch.randn(9, tiny_config["hidden_size"])
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(9)])
    weights = torch.rand(9, 2)
    with torch.inference_mode():
        want = everything[1](hidden, ids, weights)
    got = executor.start(1, hidden, ids, weights).wait()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # A layer routed entirely inside shard 0 talks to shard 0 only.
    before = list(executor.traffic.exchanges)
    executor.start(1, hidden, torch.tensor([[0, 1]] * 9), weights).wait()
    assert [a - b for a, b in zip(executor.traffic.exchanges, before, strict=True)] == [1, 0, 0, 0]
    assert [s.server.spec.expert_start for s in servers] == [0, 2, 4, 6]


async def test_shard_info_and_bad_requests_get_clear_errors(tiny_checkpoint, shard_servers):
    (server,) = shard_servers(1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = experts_pb2_grpc.ExpertsStub(channel)
        info = await stub.ShardInfo(experts_pb2.ShardInfoRequest(), timeout=5)
        assert (info.shard, info.num_shards, info.expert_start, info.expert_end) == (0, 1, 0, 8)
        assert list(info.moe_layers) == [1, 2] and info.dtype == "float32"
        call = stub.Dispatch(timeout=10)
        await call.write(experts_pb2.DispatchRequest(seq=7, layer=0))
        reply = await call.read()
        assert reply.seq == 7 and "layer 0 is not a MoE layer" in reply.error
        bad = experts_pb2.DispatchRequest(seq=8, layer=1)
        bad.hidden.dtype, bad.hidden.shape[:], bad.hidden.data = "float32", [2, 64], b"\0" * 12
        await call.write(bad)
        reply = await call.read()
        assert reply.seq == 8 and "needs 512" in reply.error
        await call.done_writing()


async def test_dead_shard_fails_requests_fast_then_recovers(tiny_checkpoint, remote_executor):
    executor, servers = remote_executor(2)
    engine = AsyncEngine(
        Engine.from_pretrained(tiny_checkpoint, experts="none", expert_executor=executor)
    )
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    first_token = asyncio.Event()

    async def run(prompt):
        deltas = []
        async for delta in engine.stream(None, prompt, params):
            deltas.append(delta)
            first_token.set()
        return deltas

    try:
        tasks = [asyncio.create_task(run(p)) for p in MIXED_PROMPTS[:4]]
        await asyncio.wait_for(first_token.wait(), 30)
        port = int(servers[1].address.rsplit(":", 1)[1])
        servers[1].stop(grace=None)
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert time.monotonic() - killed < 10
        for deltas in results:
            last = deltas[-1]
            assert last.finish_reason == "abort"
            assert "expert shard 1" in last.error
        health = await asyncio.to_thread(executor.health)
        assert [h.serving for h in health] == [True, False]
        with pytest.raises(ExpertShardError, match="expert shard 1"):
            await asyncio.to_thread(
                lambda: executor.start(
                    1, torch.zeros(1, 64), torch.tensor([[0, 7]]), torch.ones(1, 2)
                ).wait()
            )

        # The shard comes back (same address, as a restarted pod or replica would): new
        # requests succeed without touching the engine.
        replacement = ThreadedShardServer.from_checkpoint(tiny_checkpoint, 1, 2)
        replacement.start("127.0.0.1", port)
        try:
            await asyncio.sleep(0.6)  # past the reconnect back-off
            health = await asyncio.to_thread(executor.health)
            assert [h.serving for h in health] == [True, True]
            short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
            deltas = [d async for d in engine.stream(None, MIXED_PROMPTS[0], short)]
            assert deltas[-1].finish_reason == "length" and not deltas[-1].error
            assert sum(len(d.token_ids) for d in deltas) == 5
        finally:
            replacement.stop(grace=None)
    finally:
        engine.close()


def test_bfloat16_shards(tiny_checkpoint, tiny_config):
    """Hidden states and partial sums cross the wire as bfloat16 when the model runs in it."""
    from services.experts import RemoteExpertExecutor

    servers = [
        ThreadedShardServer.from_checkpoint(tiny_checkpoint, k, 2, torch.bfloat16) for k in range(2)
    ]
    executor = None
    try:
        for server in servers:
            server.start()
        executor = RemoteExpertExecutor.for_checkpoint(
            str(tiny_checkpoint), 2, targets=[s.address for s in servers]
        )
        executor.connect(timeout=10)
        everything = model.load_routed_experts(tiny_checkpoint, 0, 8, torch.bfloat16)
        torch.manual_seed(1)
        hidden = torch.randn(6, tiny_config["hidden_size"]).to(torch.bfloat16)
        ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 3], [5, 6]])  # within a shard
        weights = torch.rand(6, 2)
        got = executor.start(2, hidden, ids, weights).wait()
        assert got.dtype == torch.bfloat16
        with torch.inference_mode():
            want = everything[2](hidden, ids, weights)
        assert torch.equal(got, want)  # one shard per row: bit-identical
        sent = executor.traffic.bytes_sent
        assert sum(sent) < 6 * tiny_config["hidden_size"] * 4  # 2 bytes per value, not 4
    finally:
        if executor is not None:
            executor.close()
        for server in servers:
            server.stop(grace=None)


def test_a_shard_that_stops_answering_times_out_instead_of_hanging():
    """A stuck shard (alive, silent) fails the exchange after exchange_timeout_s."""
    import threading

    from services.experts import RemoteExpertExecutor, ShardSpec

    release = threading.Event()

    def stuck(hidden, expert_ids, weights):
        release.wait(30)
        return hidden

    server = ThreadedShardServer({1: stuck}, ShardSpec(0, 1, 0, 4, torch.float32, (1,)))
    server.start()
    executor = RemoteExpertExecutor(4, 1, targets=[server.address], exchange_timeout_s=1.0)
    try:
        executor.connect(timeout=10)
        started = time.monotonic()
        with pytest.raises(ExpertShardError, match=r"did not answer within 1.0 s"):
            executor.start(
                1, torch.zeros(2, 8), torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2)
            ).wait()
        assert time.monotonic() - started < 3
    finally:
        release.set()
        executor.close()
        server.stop(grace=None)
