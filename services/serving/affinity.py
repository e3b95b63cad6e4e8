"""Where a request's prefix is cached, and which Engine replica should serve it.

Pure bookkeeping, no Ray: `prefix_keys` turns a GenerateRequest into chained hashes of its
prompt's pieces, `PrefixIndex` remembers which replica was sent which keys (a stand-in for its
prefix cache, bounded like one), and `choose` ranks replicas from loads and matches. The Ray
Serve router (services/serving/router.py) feeds them.

Why pieces and not tokens: the router runs in Serve's proxy, which has no tokenizer. The
engine's prefix cache keys blocks by the tokens before them; a chat's earlier messages render
to the same tokens every turn, so "the same leading messages" predicts "the same cached
blocks" well. Raw text is cut into fixed character chunks, token ids into fixed id chunks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.rpc.dsv2.v1 import inference_pb2 as pb

TEXT_CHUNK_CHARS = 64
TOKEN_CHUNK_IDS = 16


@dataclass(frozen=True)
class PrefixKey:
    digest: bytes  # hash of this piece and every piece before it
    length: int  # characters (or token ids) of the prompt up to and including this piece


def _chain(pieces: Iterable[tuple[bytes, int]]) -> list[PrefixKey]:
    keys: list[PrefixKey] = []
    digest, length = b"", 0
    for payload, size in pieces:
        digest = hashlib.blake2b(digest + payload, digest_size=16).digest()
        length += size
        keys.append(PrefixKey(digest, length))
    return keys


def _images_digest(message: pb.ChatMessage) -> bytes:
    """A message's pictures as part of its key: the engine's cache keys image positions by
    the picture's content, so the same text with another picture is another prefix."""
    if not message.images:
        return b""
    h = hashlib.blake2b(digest_size=16)
    for image in message.images:
        h.update(len(image.data).to_bytes(8, "little") + image.data)
    return b"\0img" + h.digest()


def prefix_keys(
    request: pb.GenerateRequest,
    text_chunk_chars: int = TEXT_CHUNK_CHARS,
    token_chunk_ids: int = TOKEN_CHUNK_IDS,
) -> list[PrefixKey]:
    """Chained hashes of the prompt's leading pieces: one per chat message, per text chunk or
    per token-id chunk. Two prompts share their first k keys iff they share those pieces."""
    kind = request.WhichOneof("prompt")
    if kind == "messages":
        return _chain(
            (
                b"m"
                + m.role.encode()
                + b"\0"
                + m.content.encode("utf-8", "surrogatepass")
                + _images_digest(m),
                len(m.content) + 1,
            )
            for m in request.messages.messages
        )
    if kind == "text":
        text = request.text
        # A trailing partial chunk is left out: the next turn's text extends it, so it would
        # never match anyway.
        return _chain(
            (
                b"t" + text[i : i + text_chunk_chars].encode("utf-8", "surrogatepass"),
                text_chunk_chars,
            )
            for i in range(0, len(text) - text_chunk_chars + 1, text_chunk_chars)
        )
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        return _chain(
            (
                b"i" + b",".join(str(t).encode() for t in ids[i : i + token_chunk_ids]),
                token_chunk_ids,
            )
            for i in range(0, len(ids) - token_chunk_ids + 1, token_chunk_ids)
        )
    return []


class PrefixIndex:
    """Per replica, the prefix keys it was sent, least recently used dropped first: like the
    engine's cache, it forgets old prefixes as new ones arrive."""

    def __init__(self, max_keys_per_replica: int = 100_000, max_sessions: int = 100_000) -> None:
        self.max_keys_per_replica = max_keys_per_replica
        self.max_sessions = max_sessions
        self._keys: dict[str, OrderedDict[bytes, None]] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session -> last replica

    def record(self, replica: str, keys: Sequence[PrefixKey], session_id: str = "") -> None:
        held = self._keys.setdefault(replica, OrderedDict())
        for key in keys:
            held[key.digest] = None
            held.move_to_end(key.digest)
        while len(held) > self.max_keys_per_replica:
            held.popitem(last=False)
        if session_id:
            self._sessions[session_id] = replica
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def matched(self, replica: str, keys: Sequence[PrefixKey]) -> int:
        """Length of the longest leading run of `keys` this replica holds (0: none)."""
        held = self._keys.get(replica)
        length = 0
        if held:
            for key in keys:
                if key.digest not in held:
                    break
                length = key.length
        return length

    def session_replica(self, session_id: str) -> str | None:
        return self._sessions.get(session_id) if session_id else None

    def forget(self, live: Iterable[str]) -> None:
        """Drop what is known about replicas that are gone (their caches went with them)."""
        live = set(live)
        for replica in [r for r in self._keys if r not in live]:
            del self._keys[replica]
        for session in [s for s, r in self._sessions.items() if r not in live]:
            del self._sessions[session]


def home_replica(session_id: str, replicas: Iterable[str]) -> str | None:
    """The session's first choice by rendezvous hashing: every router (one per Serve proxy)
    picks the same replica for a new session without sharing state, and only sessions of a
    replica that leaves move."""
    if not session_id:
        return None
    return max(
        replicas,
        key=lambda r: hashlib.blake2b(f"{session_id}\0{r}".encode(), digest_size=8).digest(),
        default=None,
    )


@dataclass(frozen=True)
class Candidate:
    replica: str
    load: int  # requests in flight there
    capacity: int  # its max_ongoing_requests
    matched: int = 0  # prompt length whose prefix it holds
    session: bool = False  # it served this session's previous turn


@dataclass(frozen=True)
class Choice:
    ranks: list[list[str]]  # most preferred first, as Serve's choose_replicas returns them
    reason: str  # prefix | session | home | least_loaded | over_bound


def choose(candidates: Sequence[Candidate], max_imbalance: int, home: str | None = None) -> Choice:
    """Prefer the replica holding the longest cached prefix (then the session's last replica,
    then its rendezvous home) as long as its load is within `max_imbalance` requests of the
    least loaded replica; otherwise the least loaded. Later ranks list the rest by load so
    Serve can fall back when the first choice turns the request away (queue full)."""
    if not candidates:
        return Choice([], "least_loaded")
    open_ = [c for c in candidates if c.load < c.capacity] or list(candidates)
    least = min(c.load for c in open_)
    by_load = sorted(open_, key=lambda c: c.load)

    def ranked(first: Candidate, reason: str) -> Choice:
        rest = [c.replica for c in by_load if c.replica != first.replica]
        return Choice([[first.replica], rest] if rest else [[first.replica]], reason)

    within = [c for c in open_ if c.load - least <= max_imbalance]
    # Longest cached prefix first; among equals (say, a system prompt every replica has seen)
    # the session's last replica, then its home, then the lighter one.
    best = max(within, key=lambda c: (c.matched, c.session, c.replica == home, -c.load))
    if best.matched > 0 or best.session or best.replica == home:
        reason = "prefix" if best.matched > 0 else "session" if best.session else "home"
        return ranked(best, reason)
    wanted = any(c.matched > 0 or c.session or c.replica == home for c in open_)
    lightest = [c.replica for c in by_load if c.load == least]
    rest = [c.replica for c in by_load if c.load != least]
    reason = "over_bound" if wanted else "least_loaded"
    return Choice([lightest, rest] if rest else [lightest], reason)
