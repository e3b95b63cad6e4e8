"""Paged latent cache bookkeeping: block allocation, refcounts and the prefix cache.

Blocks are integers 0..num_blocks-1; the runner owns the tensors. A full block whose tokens
are all computed gets a content hash (chained with its predecessor's, so equal hashes mean
equal prefixes); a block holding image positions also hashes each such image's content
key and offset (services.engine.images), since every picture's positions hold the same
placeholder id; later sequences with the same prefix share it (refcount). Blocks nobody
uses but that still hold a hashed prefix stay in an LRU list and are evicted only when the
free list is empty, so "free" = truly free + evictable.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from services.engine.images import block_image_key
from services.engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int], images: bytes = b"") -> bytes:
    """Hash of a full block given its predecessor's hash (b"" for the first block) and the
    key of the images it overlaps (b"" for none)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    if images:
        h.update(b"\0img\0" + images)
    return h.digest()


def _seq_block_hash(seq: Sequence, parent: bytes, i: int, bs: int) -> bytes:
    lo, hi = i * bs, (i + 1) * bs
    return block_hash(parent, seq.token_ids[lo:hi], block_image_key(seq, lo, hi))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.hash_to_block: dict[bytes, int] = {}
        self.block_to_hash: dict[int, bytes] = {}
        # prefix cache statistics (in tokens)
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation -------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_to_hash.pop(block)]
        self.refcount[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached full blocks of seq's known tokens; returns the tokens reused.

        At least one token is always left to compute so that the step yields logits.
        """
        assert not seq.block_table
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        if not self.enable_prefix_caching:
            return 0
        parent = b""
        hashes: list[bytes] = []
        for i in range(max_blocks):
            h = _seq_block_hash(seq, parent, i, self.block_size)
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.refcount[block] == 0:
                del self.evictable[block]
            self.refcount[block] += 1
            seq.block_table.append(block)
            hashes.append(h)
            parent = h
        seq.block_hashes = hashes
        return len(hashes) * self.block_size

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens; False (and no change) if out of blocks."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of seq that are now full and computed, making them shareable."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        hashes = seq.block_hashes
        while len(hashes) < full:
            i = len(hashes)
            h = _seq_block_hash(seq, hashes[-1] if hashes else b"", i, self.block_size)
            hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and block not in self.block_to_hash:
                self.hash_to_block[h] = block
                self.block_to_hash[block] = h

    def free_seq(self, seq: Sequence) -> None:
        """Release seq's blocks. Tail blocks first, so the LRU evicts suffixes before prefixes."""
        for block in reversed(seq.block_table):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                if block in self.block_to_hash:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []
        seq.block_hashes = []

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
