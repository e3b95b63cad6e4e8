"""core/images.py's pure parts: content parts <-> text with markers, data URLs, the URL rule."""

from __future__ import annotations

import base64

import pytest

from services.gateway.core.errors import InvalidInput
from services.gateway.core.images import (
    check_image_url,
    decode_data_url,
    join_parts,
    neutralise_markers,
    split_parts,
)
from services.gateway.core.validation import Limits


@pytest.mark.parametrize(
    ("pieces", "content"),
    [
        (["What is this?", None], "What is this?\n<image>"),
        ([None, "How many?"], "<image>\nHow many?"),
        ([None, None, "Compare"], "<image>\n<image>\nCompare"),
        (["a", None, "b", None], "a\n<image>\nb\n<image>"),
        (["line\n", None, "\nnext"], "line\n<image>\nnext"),
        ([None], "<image>"),
        (["just text"], "just text"),
    ],
)
def test_parts_become_text_with_markers_and_back(pieces, content):
    assert join_parts(pieces) == content
    images = [("image/png", bytes([i])) for i in range(pieces.count(None))]
    back = split_parts(content, images)
    if not images:
        assert back == content
        return
    expected = []
    k = 0
    for p in pieces:
        if p is None:
            url = "data:image/png;base64," + base64.b64encode(bytes([k])).decode()
            expected.append({"type": "image_url", "image_url": {"url": url}})
            k += 1
        elif p.strip("\n"):
            expected.append({"type": "text", "text": p.strip("\n") if p != "line\n" else "line"})
    assert back == expected


def test_a_picture_no_longer_stored_is_left_out_not_shifted():
    parts = split_parts("a\n<image>\nb\n<image>", [None, ("image/gif", b"G")])
    assert parts == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,Rw=="}},
    ]


def test_data_urls():
    limits = Limits(max_image_bytes=10)
    assert decode_data_url("data:image/png;base64,aGVsbG8=", "p", limits) == b"hello"
    assert decode_data_url("data:;base64,aGVsbG8=", "p", limits) == b"hello"
    for url, says in [
        ("data:image/png;base64,aGVsbG8", "base64 is broken"),
        ("data:image/png;base64,a$b=", "base64 is broken"),
        ("data:image/png;base64,", "holds no bytes"),
        ("data:text/html;base64,aGVsbG8=", "not an image"),
        ("data:image/png,hello", "without ';base64'"),
        ("data:image/png;base64," + "A" * 40, "at most 10 bytes"),
        ("nonsense", "not a data URL"),
    ]:
        with pytest.raises(InvalidInput, match=says) as e:
            decode_data_url(url, "p", limits)
        assert e.value.param == "p"


def test_urls_only_from_allowed_hosts():
    hosts = frozenset({"images.example.com"})
    assert check_image_url("https://images.example.com/a.png", "p", hosts)
    assert check_image_url("http://IMAGES.example.com./a.png", "p", hosts)
    for url in [
        "https://evil.example.com/a.png",
        "https://images.example.com@evil.example.com/a.png",
        "https://user:pw@images.example.com/a.png",
        "ftp://images.example.com/a.png",
        "file:///etc/passwd",
        "//images.example.com/a.png",
    ]:
        with pytest.raises(InvalidInput):
            check_image_url(url, "p", hosts)
    with pytest.raises(InvalidInput, match="does not fetch images"):
        check_image_url("https://images.example.com/a.png", "p", frozenset())


def test_neutralised_markers_are_no_markers():
    text = neutralise_markers("an <image> tag and <image>")
    assert "<image>" not in text and text.count("image>") == 2
