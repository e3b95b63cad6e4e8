"""Streaming text of one request: UTF-8-safe incremental decoding plus stop strings.

Text that could still turn out to be the start of a stop string is held back until it
cannot; a matched stop string and everything after it never reach the caller.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, detokenizer: Any | None, stop: list[str]):
        self.detok = detokenizer  # model.tokenizer.IncrementalDetokenizer or None (ids only)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text decoded so far (up to a stop string when one matched)
        self.emitted = 0  # chars of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a generated token; returns (text safe to emit now, stop string matched)."""
        if self.detok is None:
            return "", False
        new = self.detok.push(token_id)
        if not new:
            return "", False
        return self._add(new)

    def _add(self, new: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.hold)
        self.text += new
        if self.stop:
            cut = min(
                (i for i in (self.text.find(s, start) for s in self.stop) if i >= 0),
                default=-1,
            )
            if cut >= 0:
                self.text = self.text[:cut]
                return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self.hold), False

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def finish(self) -> str:
        """The request ended for another reason: flush held-back and undecoded text."""
        if self.detok is not None:
            tail = self.detok.flush()
            if tail:
                out, stopped = self._add(tail)
                if stopped:
                    return out
                return out + self._emit(len(self.text))
        return self._emit(len(self.text))
