"""Priority classes of requests, and the engine's refusal when it is overloaded.

Three classes, highest first: internal > pro > free. The gateway maps each quota tier to one
(the tiers file's `priority`); the model plane's API carries it in `GenerateRequest.priority`.
The scheduler admits waiting requests by class, first come first served within one, and ages
a waiting request so that nothing starves; under overload the engine refuses new requests of
the classes it sheds (`EngineOptions.shed_priorities`) at once with `Overloaded`.
"""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    FREE = 0
    PRO = 1
    INTERNAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str, setting: str) -> Priority:
        """The class called `name` (free, pro, internal); ValueError naming `setting` else."""
        if isinstance(name, str):
            try:
                return cls[name.strip().upper()]
            except KeyError:
                pass
        known = ", ".join(p.label for p in cls)
        raise ValueError(f"{setting}: unknown priority {name!r}; use one of {known}")


class Overloaded(Exception):
    """The engine's queue is past its bound and this request's class is shed: refused before
    any work (the gateway answers 503 + Retry-After / gRPC UNAVAILABLE). Not a ValueError: the
    request itself is fine and may be retried later."""
