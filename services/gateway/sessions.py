"""Chat sessions in Redis: a metadata hash, a message list and a per-user index sorted by
update time, all expiring after the owner's tier TTL. Only the owner sees a session (anyone
else gets "not found"); one turn at a time per session (a lock with a renewed expiry)."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.gateway.errors import Conflict, NotFound
from services.gateway.redis_store import Keyspace, load_script

SESSION_ID_RE = re.compile(r"^sess_[0-9a-f]{24}$")
TITLE_MAX_CHARS = 80


def now_ms() -> int:
    return int(time.time() * 1000)


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(8)


@dataclass
class StoredMessage:
    id: str
    role: str
    content: str
    created_at_ms: int

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "role": self.role, "content": self.content, "t": self.created_at_ms},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str) -> StoredMessage:
        d = json.loads(raw)
        return cls(id=d["id"], role=d["role"], content=d["content"], created_at_ms=int(d["t"]))


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


def title_from(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_MAX_CHARS else line[: TITLE_MAX_CHARS - 1] + "…"


class SessionStore:
    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, *, lock_ms: int) -> None:
        self.r = redis
        self.ks = keyspace
        self.lock_ms = lock_ms
        self._append = load_script(redis, "session_append")
        self._delete = load_script(redis, "session_delete")
        self._turn_begin = load_script(redis, "turn_begin")
        self._turn_end = load_script(redis, "turn_end")

    async def create(
        self, owner: str, ttl_s: int, title: str = "", system_prompt: str = ""
    ) -> Session:
        sid = "sess_" + secrets.token_hex(12)
        t = now_ms()
        session = Session(sid, owner, title, system_prompt, t, t)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.ks.session(sid),
                mapping={
                    "id": sid,
                    "owner": owner,
                    "title": title,
                    "system_prompt": system_prompt,
                    "created_at": t,
                    "updated_at": t,
                },
            )
            pipe.expire(self.ks.session(sid), ttl_s)
            pipe.zadd(self.ks.user_sessions(owner), {sid: t})
            pipe.expire(self.ks.user_sessions(owner), ttl_s)
            await pipe.execute()
        return session

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
        return session

    async def list(self, owner: str, limit: int = 100) -> list[Session]:
        index = self.ks.user_sessions(owner)
        ids = await self.r.zrevrange(index, 0, max(0, limit - 1))
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.hgetall(self.ks.session(sid))
            metas = await pipe.execute()
        out, gone = [], []
        for sid, meta in zip(ids, metas, strict=True):
            if meta and meta.get("owner") == owner:
                out.append(Session.from_hash(meta))
            else:
                gone.append(sid)
        if gone:  # expired sessions: drop them from the index lazily
            await self.r.zrem(index, *gone)
        return out

    async def delete(self, owner: str, session_id: str) -> None:
        if not SESSION_ID_RE.match(session_id):
            raise _not_found(session_id)
        ok = await self._delete(
            keys=[
                self.ks.session(session_id),
                self.ks.session_messages(session_id),
                self.ks.session_turn(session_id),
                self.ks.user_sessions(owner),
            ],
            args=[owner, session_id],
        )
        if not ok:
            raise _not_found(session_id)

    async def append(self, owner: str, session_id: str, message: StoredMessage, ttl_s: int) -> bool:
        """Append atomically; False when the session vanished (deleted/expired) meanwhile."""
        title = title_from(message.content) if message.role == "user" else ""
        ok = await self._append(
            keys=[
                self.ks.session(session_id),
                self.ks.session_messages(session_id),
                self.ks.user_sessions(owner),
            ],
            args=[owner, message.to_json(), message.created_at_ms, ttl_s, title, session_id],
        )
        return bool(ok)

    async def begin_turn(self, owner: str, session_id: str) -> str:
        """Take the session's turn lock; returns its token. NotFound / Conflict (409)."""
        if not SESSION_ID_RE.match(session_id):
            raise _not_found(session_id)
        token = secrets.token_hex(8)
        res = await self._turn_begin(
            keys=[self.ks.session(session_id), self.ks.session_turn(session_id)],
            args=[owner, token, self.lock_ms],
        )
        if res == 0:
            raise _not_found(session_id)
        if res == -1:
            raise Conflict(
                f"Session {session_id} already has a reply in progress; wait for it to finish "
                "(one turn at a time per session)."
            )
        return token

    async def renew_turn(self, session_id: str, token: str) -> None:
        await self._turn_end(keys=[self.ks.session_turn(session_id)], args=[token, self.lock_ms])

    async def end_turn(self, session_id: str, token: str) -> None:
        await self._turn_end(keys=[self.ks.session_turn(session_id)], args=[token, "0"])


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"No session {session_id[:64]!r} (it may have expired or been deleted).")
