"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character (a Chinese character is
three bytes, often split across tokens). Decoding such a prefix yields U+FFFD; we hold text
back until the decoded window no longer ends in U+FFFD, so every emitted piece is final.
Only a short window (tokens since the last emission) is decoded per token.
"""

from __future__ import annotations

from model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window (a character boundary)
        self._read = 0  # ids before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text ("" while a character is open)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is held back (incomplete bytes come out as U+FFFD); call at the end."""
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(before) :]
