"""The router's choice logic (services/serving/affinity.py), without Ray."""

from __future__ import annotations

import pickle

from ray.serve._private.common import gRPCRequest

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.serving.affinity import (
    Candidate,
    PrefixIndex,
    choose,
    home_replica,
    prefix_keys,
)


def _chat(*contents: str, session: str = "") -> pb.GenerateRequest:
    roles = ["system"] + ["user", "assistant"] * len(contents)
    messages = [pb.ChatMessage(role=r, content=c) for r, c in zip(roles, contents, strict=False)]
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=messages), session_id=session)


def test_a_second_turn_shares_the_first_turns_keys():
    first = prefix_keys(_chat("Be brief.", "What is 2+2?"))
    second = prefix_keys(_chat("Be brief.", "What is 2+2?", "4", "And 3+3?"))
    other = prefix_keys(_chat("Be brief.", "Name a colour."))
    assert second[: len(first)] == first
    assert other[0] == first[0] and other[1] != first[1]  # same system prompt, then apart
    # lengths grow with the content, so a longer shared prefix scores higher
    assert [k.length for k in first] == [len("Be brief.") + 1, len("Be brief.What is 2+2?") + 2]


def test_text_and_token_prompts_are_cut_into_chunks():
    text = pb.GenerateRequest(text="x" * 130)
    assert [k.length for k in prefix_keys(text, text_chunk_chars=64)] == [64, 128]
    ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(40))))
    longer = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[*range(40), 7, 7, 7]))
    assert len(prefix_keys(ids, token_chunk_ids=16)) == 2
    assert prefix_keys(longer, token_chunk_ids=16)[:2] == prefix_keys(ids, token_chunk_ids=16)
    assert prefix_keys(pb.GenerateRequest()) == []


def test_index_matches_the_longest_run_and_forgets_old_keys():
    index = PrefixIndex(max_keys_per_replica=3)
    turn1 = prefix_keys(_chat("sys", "hello"))
    turn2 = prefix_keys(_chat("sys", "hello", "hi", "more"))
    index.record("a", turn1, session_id="s1")
    assert index.matched("a", turn2) == turn1[-1].length
    assert index.matched("b", turn2) == 0
    assert index.session_replica("s1") == "a"
    index.record("a", prefix_keys(_chat("other", "x", "y")))  # 3 new keys push the old out
    assert index.matched("a", turn2) == 0
    index.forget(["b"])
    assert index.session_replica("s1") is None


def test_home_replica_is_stable_and_moves_only_the_leavers_sessions():
    replicas = ["r1", "r2", "r3"]
    homes = {s: home_replica(s, replicas) for s in (f"session-{i}" for i in range(60))}
    assert set(homes.values()) == set(replicas)  # spread over all of them
    assert homes == {s: home_replica(s, list(reversed(replicas))) for s in homes}
    after = {s: home_replica(s, ["r1", "r2"]) for s in homes}
    assert all(after[s] == h for s, h in homes.items() if h != "r3")
    assert home_replica("", replicas) is None


def test_longest_prefix_wins_while_within_the_bound():
    cands = [
        Candidate("a", load=3, capacity=64, matched=10),
        Candidate("b", load=1, capacity=64, matched=40),
        Candidate("c", load=0, capacity=64),
    ]
    choice = choose(cands, max_imbalance=2)
    assert choice.ranks == [["b"], ["c", "a"]] and choice.reason == "prefix"


def test_over_the_bound_goes_to_the_least_loaded():
    cands = [
        Candidate("a", load=5, capacity=64, matched=40, session=True),
        Candidate("b", load=2, capacity=64),
        Candidate("c", load=2, capacity=64),
    ]
    choice = choose(cands, max_imbalance=2)
    assert choice.ranks == [["b", "c"], ["a"]] and choice.reason == "over_bound"
    # exactly at the bound still counts as within it
    assert choose(cands, max_imbalance=3).ranks[0] == ["a"]


def test_session_then_home_break_ties_then_load():
    shared = [  # every replica saw the system prompt
        Candidate("a", load=0, capacity=8, matched=5),
        Candidate("b", load=1, capacity=8, matched=5, session=True),
    ]
    assert choose(shared, max_imbalance=4).ranks[0] == ["b"]
    fresh = [Candidate("a", load=0, capacity=8), Candidate("b", load=1, capacity=8)]
    home = choose(fresh, max_imbalance=4, home="b")
    assert home.ranks == [["b"], ["a"]] and home.reason == "home"
    plain = choose(fresh, max_imbalance=4)
    assert plain.ranks == [["a"], ["b"]] and plain.reason == "least_loaded"


def test_full_replicas_are_skipped_unless_all_are_full():
    cands = [
        Candidate("a", load=8, capacity=8, matched=40),
        Candidate("b", load=7, capacity=8),
    ]
    assert choose(cands, max_imbalance=4).ranks == [["b"]]
    full = [Candidate("a", load=8, capacity=8, matched=1), Candidate("b", load=8, capacity=8)]
    assert choose(full, max_imbalance=0).ranks[0] == ["a"]  # Serve probes and backs off
    assert choose([], max_imbalance=1).ranks == []


async def test_router_reads_the_request_the_grpc_proxy_pickles():
    # async: PendingRequest makes an asyncio.Future, which needs a running loop
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from services.serving.router import generate_request_of

    request = _chat("sys", "hi", session="s-9")
    raw = pickle.dumps(gRPCRequest(user_request_proto=request.SerializeToString()))
    meta = RequestMetadata(request_id="r", internal_request_id="i", call_method="Generate")
    assert generate_request_of(PendingRequest(args=[raw], kwargs={}, metadata=meta)) == request
    health = RequestMetadata(request_id="r", internal_request_id="i", call_method="Health")
    assert generate_request_of(PendingRequest(args=[raw], kwargs={}, metadata=health)) is None
    junk = PendingRequest(args=[b"not a pickle"], kwargs={}, metadata=meta)
    assert generate_request_of(junk) is None


def test_pictures_are_part_of_a_messages_key():
    def turn(picture: bytes) -> pb.GenerateRequest:
        image = pb.Image(data=picture, mime_type="image/png")
        messages = [
            pb.ChatMessage(role="system", content="Be brief."),
            pb.ChatMessage(role="user", content="<image>\nWhat is this?", images=[image]),
        ]
        return pb.GenerateRequest(messages=pb.ChatMessages(messages=messages))

    cat, dog = prefix_keys(turn(b"cat pixels")), prefix_keys(turn(b"dog pixels"))
    assert prefix_keys(turn(b"cat pixels")) == cat  # the same picture: the same replica
    assert cat[0] == dog[0] and cat[1] != dog[1]  # same text, another picture: apart
    text_only = prefix_keys(_chat("Be brief.", "<image>\nWhat is this?"))
    assert text_only[1] != cat[1]
