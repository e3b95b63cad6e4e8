"""Block allocation, free-block accounting and the content-hash prefix cache."""

from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.params import SamplingParams
from services.engine.sequence import Sequence
from services.engine.text import TextStream


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(temperature=0), TextStream(None, []), None)


def computed(s: Sequence, bm: BlockManager) -> None:
    """Pretend the forward pass wrote every token's latent."""
    assert bm.ensure_slots(s, len(s.token_ids))
    s.num_computed = len(s.token_ids)
    bm.commit_full_blocks(s)


def test_allocation_accounts_every_block_and_refuses_when_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(10)))
    assert bm.ensure_slots(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    b = seq(list(range(100, 108)), "b")
    assert not bm.ensure_slots(b, 8)  # needs 2, one left: nothing taken
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.free_seq(a)
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    assert bm.capacity_tokens == 16


def test_same_prefix_shares_full_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)))
    computed(a, bm)
    b = seq([*range(8), 50, 51, 52])  # shares two full blocks, then differs
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.refcount[a.block_table[0]] == 2
    # the partial third block of a is never shared
    c = seq(list(range(10)), "c")
    assert bm.match_prefix(c) == 8


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(8)))
    computed(a, bm)
    b = seq(list(range(8)), "b")
    assert bm.match_prefix(b) == 4  # the last block is recomputed to get logits


def test_freed_prefix_survives_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4])
    computed(a, bm)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4  # evictable counts as free
    b = seq([1, 2, 3, 4, 5], "b")
    assert bm.match_prefix(b) == 4  # still cached after a finished
    bm.free_seq(b)
    # fill the cache with other content: the old prefix is evicted, oldest first
    c = seq([9, 9, 8, 8, 7, 7, 6, 6], "c")
    computed(c, bm)
    d = seq([1, 2, 3, 4, 5], "d")
    assert bm.match_prefix(d) == 0


def test_disabled_prefix_cache_never_matches():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4, 5])
    computed(a, bm)
    bm.free_seq(a)
    assert bm.match_prefix(seq([1, 2, 3, 4, 5], "b")) == 0
