"""Idempotent session turns: a client sends the same key on every try of one turn, and the
turn's user message gets an id derived from it (sessions.keyed_message_id). A retry finds
what an earlier try stored: a turn stored whole is replayed; one whose reply was cut short
(finish reason error/cancelled) and is still the session's last turn is generated again,
replacing it (session_append.lua). So a retry never stores the user's message twice."""

from __future__ import annotations

from services.gateway.core.errors import InvalidInput
from services.gateway.core.sessions import Session, StoredMessage

IDEMPOTENCY_KEY_MAX = 255


def check_idempotency_key(key: str) -> None:
    """1-255 printable ASCII characters (a UUID is the usual choice)."""
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not all(" " <= c <= "~" for c in key):
        raise InvalidInput(
            f"The idempotency key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII "
            "characters (e.g. a UUID), the same on every retry of one turn.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )


def earlier_attempt(
    session: Session, user_id: str, content: str, image_ids: list[str] | None = None
) -> tuple[int | None, StoredMessage | None]:
    """(index to replace from, reply to replay) for a turn whose user message would get
    `user_id`: (None, None) when no earlier attempt stored it. image_ids: the pictures' ids
    (StoredImage.id), compared too when given (None: not known before fetching)."""
    idx = next((i for i, m in enumerate(session.messages) if m.id == user_id), None)
    if idx is None:
        return None, None
    stored = session.messages[idx]
    if stored.content != content or (
        image_ids is not None and [i.id for i in stored.images] != image_ids
    ):
        raise InvalidInput(
            "This idempotency key was already used for a different message in this session; "
            "use a new key for a new message.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    after = session.messages[idx + 1 :]
    reply = after[0] if after and after[0].role == "assistant" else None
    last_turn = len(after) <= 1
    if reply is not None and (reply.complete or not last_turn):
        return None, reply
    return idx, None
