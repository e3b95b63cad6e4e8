"""Chat sessions in Redis: a metadata hash, a message list and a per-user index sorted by
update time, all expiring after the owner's tier TTL. Only the owner sees a session (anyone
else gets "not found"); one turn at a time per session (a lock with a renewed expiry).

What one identity stores is capped by its tier (tiers.py), atomically in Lua: creating a
session past `max_sessions` deletes the owner's least recently updated ones
(session_create.lua); a turn past `max_messages_per_session` / `max_session_bytes` is refused
with 409 before any work (turn_begin.lua). A turn's user message and reply are stored together
when it ends (session_append.lua), so a failed turn stores nothing.

Sessions may live in their own Redis (Settings.sessions_redis_url) run with an LRU eviction
policy, so any of these keys can vanish under memory pressure: every read here treats a missing
key as "expired" rather than as an error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from services.gateway.backends.redis_store import Keyspace, load_script
from services.gateway.core.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from services.gateway.core.tiers import Tier

# The marker of a picture's place in a message (core/images.py IMAGE_PLACEHOLDER).
IMAGE_MARKER = "<image>"
SESSION_ID_RE = re.compile(r"^sess_[0-9a-f]{24}$")
TITLE_MAX_CHARS = 80
LIST_MAX = 100  # sessions per page of GET /v1/sessions / ListSessions
_CURSOR_RE = re.compile(r"^(\d{1,16}):(sess_[0-9a-f]{24})$")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(8)


def keyed_message_id(session_id: str, idempotency_key: str) -> str:
    """The id of the user message a turn with this Idempotency-Key stores: the same for every
    retry, so a retry finds what an earlier attempt stored (and never stores it twice)."""
    digest = hashlib.sha256(f"{session_id}\0{idempotency_key}".encode()).hexdigest()
    return "msg_" + digest[:16]


@dataclass
class StoredImage:
    """A picture of a stored user message. The message's JSON holds (id, mime type, size);
    the bytes live once per session in the session's image hash (Keyspace.session_images),
    so the same picture sent twice is stored once."""

    id: str  # blake2b of the file's bytes, hex
    mime_type: str
    size: int  # bytes of the file
    data: bytes = b""  # filled by SessionStore.get; b"" when no longer stored (evicted)

    @classmethod
    def of(cls, data: bytes, mime_type: str) -> StoredImage:
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        return cls(id=digest, mime_type=mime_type, size=len(data), data=data)


@dataclass
class StoredMessage:
    id: str
    role: str
    content: str  # with pictures: one "<image>" marker per entry of `images`, in order
    created_at_ms: int
    # Replies only: how the generation ended ("stop", "length", or "error"/"cancelled" for a
    # partial reply that a retry with the same Idempotency-Key may replace); "" = not recorded.
    finish_reason: str = ""
    images: list[StoredImage] = field(default_factory=list)

    def to_json(self) -> str:
        d: dict = {"id": self.id, "role": self.role, "content": self.content}
        d["t"] = self.created_at_ms
        if self.finish_reason:
            d["f"] = self.finish_reason
        if self.images:
            d["img"] = [[i.id, i.mime_type, i.size] for i in self.images]
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> StoredMessage:
        d = json.loads(raw)
        return cls(
            id=d["id"],
            role=d["role"],
            content=d["content"],
            created_at_ms=int(d["t"]),
            finish_reason=d.get("f", ""),
            images=[StoredImage(str(i), str(m), int(n)) for i, m, n in d.get("img", ())],
        )

    @property
    def complete(self) -> bool:
        return self.finish_reason in ("", "stop", "length")


@dataclass
class Session:
    id: str
    owner: str
    title: str
    system_prompt: str
    created_at_ms: int
    updated_at_ms: int
    messages: list[StoredMessage] = field(default_factory=list)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Session:
        return cls(
            id=h["id"],
            owner=h["owner"],
            title=h.get("title", ""),
            system_prompt=h.get("system_prompt", ""),
            created_at_ms=int(h["created_at"]),
            updated_at_ms=int(h["updated_at"]),
        )


@dataclass
class SessionPage:
    sessions: list[Session]
    has_more: bool
    next_cursor: str | None  # pass as `after` for the next page; None on the last page


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def title_from(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_MAX_CHARS else line[: TITLE_MAX_CHARS - 1] + "…"


class SessionStore:
    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, *, lock_ms: int) -> None:
        self.r = redis
        self.ks = keyspace
        self.lock_ms = lock_ms
        self._create = load_script(redis, "session_create")
        self._append = load_script(redis, "session_append")
        self._delete = load_script(redis, "session_delete")
        self._turn_begin = load_script(redis, "turn_begin")
        self._turn_end = load_script(redis, "turn_end")

    async def create(
        self, owner: str, tier: Tier, title: str = "", system_prompt: str = ""
    ) -> tuple[Session, int]:
        """A new session, and how many of the owner's oldest sessions were deleted to keep
        within tier.max_sessions. InvalidInput when the title and system prompt alone are
        over tier.max_session_bytes (no turn could ever be stored)."""
        size = utf8_len(title) + utf8_len(system_prompt)
        if tier.max_session_bytes and size > tier.max_session_bytes:
            raise InvalidInput(
                f"The title and system prompt are {size} bytes, over the limit of "
                f"{tier.max_session_bytes} bytes per session for the {tier.name} tier; "
                "shorten the system prompt.",
                param="system_prompt",
                code="session_too_large",
            )
        sid = "sess_" + secrets.token_hex(12)
        t = now_ms()
        evicted = await self._write(
            self._create,
            keys=[self.ks.session(sid), self.ks.user_sessions(owner)],
            args=[
                owner,
                sid,
                t,
                tier.session_ttl_s,
                title,
                system_prompt,
                size,
                tier.max_sessions,
                self.ks.p,
            ],
        )
        return Session(sid, owner, title, system_prompt, t, t), int(evicted)

    async def _write(self, script, *, keys: list[str], args: list):
        """Run a writing script; a Redis refusing writes for lack of memory (a shared Redis
        with `noeviction`) becomes a clear 503 instead of an internal error."""
        try:
            return await script(keys=keys, args=args)
        except ResponseError as e:
            # Redis refuses either the EVALSHA itself (a plain -OOM reply) or, when memory
            # crosses the limit between two writes of the script, the write inside it (a
            # script error wrapping the -OOM): both mean the same thing to the caller
            if not isinstance(e, OutOfMemoryError) and "OOM command not allowed" not in str(e):
                raise
            raise ServiceUnavailable(
                "The session store is full; please retry later or delete old sessions.",
                code="session_store_full",
                headers={"Retry-After": "60"},
            ) from e

    async def get(self, owner: str, session_id: str, *, with_messages: bool = True) -> Session:
        """The session, or NotFound when it does not exist or belongs to someone else (the two
        are indistinguishable on purpose)."""
        if not SESSION_ID_RE.match(session_id):
            raise _not_found(session_id)
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.ks.session(session_id))
            pipe.lrange(self.ks.session_messages(session_id), 0, -1)
            meta, raw_msgs = await pipe.execute()
        if not meta or meta.get("owner") != owner:
            raise _not_found(session_id)
        session = Session.from_hash(meta)
        if with_messages:
            session.messages = [StoredMessage.from_json(m) for m in raw_msgs]
            await self._load_images(session)
        return session

    async def _load_images(self, session: Session) -> None:
        """The pictures' bytes, in one round trip (none for a session without pictures)."""
        wanted = sorted({i.id for m in session.messages for i in m.images})
        if not wanted:
            return
        found = await self.r.hmget(self.ks.session_images(session.id), wanted)
        data = {k: base64.b64decode(v) for k, v in zip(wanted, found, strict=True) if v}
        for m in session.messages:
            for image in m.images:
                image.data = data.get(image.id, b"")

    async def list(
        self, owner: str, limit: int = LIST_MAX, after: str | None = None
    ) -> SessionPage:
        """One page of the owner's sessions, most recently updated first. `after` is the
        previous page's next_cursor ("<updated ms>:<id>"): paging by (score, id) rather than
        by offset, so deleting or expiring sessions between pages skips none."""
        index = self.ks.user_sessions(owner)
        limit = max(1, min(limit, LIST_MAX))
        async with self.r.pipeline(transaction=False) as pipe:
            if after:
                m = _CURSOR_RE.match(after)
                if m is None:
                    raise InvalidInput(
                        "after is not a cursor from a previous page (use next_cursor).",
                        param="after",
                        code="invalid_cursor",
                    )
                score, last_id = int(m.group(1)), m.group(2)
                # Ties on the cursor's score (same ms) come in reverse id order, like ZREVRANGE.
                pipe.zrevrangebyscore(index, score, score, withscores=True)
                pipe.zrevrangebyscore(
                    index, f"({score}", "-inf", start=0, num=limit + 1, withscores=True
                )
                ties, rest = await pipe.execute()
                entries = [(sid, sc) for sid, sc in ties if sid < last_id] + rest
            else:
                pipe.zrevrange(index, 0, limit, withscores=True)
                (entries,) = await pipe.execute()
        entries = entries[: limit + 1]
        has_more = len(entries) > limit
        page = entries[:limit]
        if not page:
            return SessionPage([], False, None)
        async with self.r.pipeline(transaction=False) as pipe:
            for sid, _ in page:
                pipe.hgetall(self.ks.session(sid))
            metas = await pipe.execute()
        out, gone = [], []
        for (sid, _), meta in zip(page, metas, strict=True):
            if meta and meta.get("owner") == owner and "created_at" in meta:
                out.append(Session.from_hash(meta))
            else:
                gone.append(sid)
        if gone:  # expired or evicted sessions: drop them from the index lazily
            await self.r.zrem(index, *gone)
        last_id, last_score = page[-1]
        cursor = f"{int(last_score)}:{last_id}" if has_more else None
        return SessionPage(out, has_more, cursor)

    async def delete(self, owner: str, session_id: str) -> None:
        if not SESSION_ID_RE.match(session_id):
            raise _not_found(session_id)
        ok = await self._delete(
            keys=[
                self.ks.session(session_id),
                self.ks.session_messages(session_id),
                self.ks.session_turn(session_id),
                self.ks.user_sessions(owner),
                self.ks.session_images(session_id),
            ],
            args=[owner, session_id],
        )
        if not ok:
            raise _not_found(session_id)

    async def append(
        self,
        owner: str,
        session_id: str,
        messages: list[StoredMessage],
        ttl_s: int,
        *,
        replace_from: int | None = None,
    ) -> bool:
        """Store a turn's messages atomically; False when the session vanished (deleted,
        expired or evicted) meanwhile. replace_from: the index of the first stored message
        to replace (a retried turn's user message, which must be there with messages[0]'s
        id): it and everything after it give way to `messages`."""
        title = next(
            (
                title_from(m.content.replace(IMAGE_MARKER, " "))
                for m in messages
                if m.role == "user"
            ),
            "",
        )
        size = sum(utf8_len(m.content) for m in messages)
        images = {i.id: i for m in messages for i in m.images if i.data}
        image_args: list = []
        for image in images.values():
            image_args += [image.id, base64.b64encode(image.data).decode("ascii"), image.size]
        ok = await self._write(
            self._append,
            keys=[
                self.ks.session(session_id),
                self.ks.session_messages(session_id),
                self.ks.user_sessions(owner),
                self.ks.session_images(session_id),
            ],
            args=[
                owner,
                messages[-1].created_at_ms,
                ttl_s,
                title,
                session_id,
                size,
                -1 if replace_from is None else replace_from,
                messages[0].id,
                len(images),
                *image_args,
                *(m.to_json() for m in messages),
            ],
        )
        return bool(ok)

    async def begin_turn(
        self, owner: str, tier: Tier, session_id: str, content: str, *, image_bytes: int = 0
    ) -> str:
        """Take the session's turn lock; returns its token. NotFound; Conflict (409) when a
        turn is running or the session has no room left for this turn under the tier's caps
        (messages, text bytes, picture bytes)."""
        if not SESSION_ID_RE.match(session_id):
            raise _not_found(session_id)
        token = secrets.token_hex(8)
        res = await self._write(
            self._turn_begin,
            keys=[
                self.ks.session(session_id),
                self.ks.session_turn(session_id),
                self.ks.session_messages(session_id),
            ],
            args=[
                owner,
                token,
                self.lock_ms,
                tier.max_messages_per_session,
                tier.max_session_bytes,
                utf8_len(content),
                tier.max_session_image_bytes,
                image_bytes,
            ],
        )
        if res == 0:
            raise _not_found(session_id)
        if res == -1:
            raise Conflict(
                f"Session {session_id} already has a reply in progress; wait for it to finish "
                "(one turn at a time per session)."
            )
        if res == -2:
            raise Conflict(
                f"Session {session_id} is full: it holds the {tier.name} tier's limit of "
                f"{tier.max_messages_per_session} messages. Start a new session.",
                code="session_full",
            )
        if res == -3:
            raise Conflict(
                f"Session {session_id} is full: this message would take it over the "
                f"{tier.name} tier's limit of {tier.max_session_bytes} bytes per session. "
                "Start a new session (or send a shorter message).",
                code="session_full",
            )
        if res == -4:
            raise Conflict(
                f"Session {session_id} is full of pictures: this message's images would take it "
                f"over the {tier.name} tier's limit of {tier.max_session_image_bytes} bytes of "
                "images per session. Start a new session (or send smaller pictures).",
                code="session_full",
            )
        return token

    async def renew_turn(self, session_id: str, token: str) -> None:
        await self._turn_end(keys=[self.ks.session_turn(session_id)], args=[token, self.lock_ms])

    async def end_turn(self, session_id: str, token: str) -> None:
        await self._turn_end(keys=[self.ks.session_turn(session_id)], args=[token, "0"])


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"No session {session_id[:64]!r} (it may have expired or been deleted).")
