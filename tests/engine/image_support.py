"""Pictures for engine tests."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace


def picture(num_tokens: int, tag: str, layout: tuple[int, int] = (2, 1)):
    """A processed picture of `num_tokens` positions whose content hash depends on `tag`
    (host-side tests: no pixels)."""
    return SimpleNamespace(
        tiles=None,
        layout=SimpleNamespace(nw=layout[0], nh=layout[1]),
        num_tokens=num_tokens,
        content_hash=hashlib.blake2b(tag.encode(), digest_size=16).digest(),
    )
