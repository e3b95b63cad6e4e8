"""Pictures through the gateway: OpenAI image_url content parts (HTTP), Message.images (gRPC),
sessions that keep their pictures, the image quotas, and bad pictures refused with a 400 /
INVALID_ARGUMENT naming what to fix and charging nothing beyond the request.

The model plane here is the scripted one (tests/gateway/scripted_backend.py), a TEST DOUBLE:
these are gateway-unit tests, and the scripted plane reads pictures the way the contract says
the real one does (one `<image>` marker per picture, INVALID_ARGUMENT otherwise, each picture a
fixed number of tokens). The real engine's end-to-end check is separate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import random
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import grpc
import httpx
import openai
import pytest
import redis
from PIL import Image

from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc
from tests.gateway.conftest import ThreadedGateway, auth, read_sse

MODEL = "dsv2-vl-scripted"


def png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height (e.g. 100 megapixels) with almost no data:
    what a real one-colour 100 MP PNG looks like to a decoder before it decodes (it compresses
    to a few hundred kB), built in a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict | str, max_tokens: int = 8) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


def tokens_used(gw: ThreadedGateway, key: str) -> tuple[int, int]:
    """(tokens charged today, requests counted today) from GET /v1/usage."""
    with httpx.Client(base_url=gw.http_url) as c:
        u = c.get("/v1/usage", headers=auth(key)).json()
    tok = u["tokens_per_day"]
    return tok["limit"] - tok["remaining"], u


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def grpc_chat(gw: ThreadedGateway, key: str, req: cpb.ChatRequest) -> list[cpb.ChatResponse]:
    async with grpc.aio.insecure_channel(gw.grpc_target) as ch:
        return [r async for r in chat_pb2_grpc.ChatStub(ch).Chat(req, metadata=md(key))]


# --- a picture goes through ----------------------------------------------------------------


async def test_image_part_reaches_the_model_plane_as_marker_and_bytes(vision_gateway):
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("viewer", "pictures")
    picture = png()
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post(
            "/v1/chat/completions",
            headers=auth(key),
            json=ask("What is in this picture?", image_part(data_url(picture))),
        )
    assert r.status_code == 200, r.text
    (req,) = b.requests
    (msg,) = req.messages.messages
    assert msg.content == "What is in this picture?\n<image>"
    assert [(i.data, i.mime_type) for i in msg.images] == [(picture, "image/png")]
    usage = r.json()["usage"]
    # Scripted rule: 3 + 6 words (the marker is one) + 50 per picture + 2.
    assert usage["prompt_tokens"] == 3 + 6 + 50 + 2
    charged, _ = tokens_used(gw, key)
    assert charged == usage["total_tokens"]  # the reservation's unused part refunded


async def test_openai_client_with_image_parts_and_declared_type_checked(vision_gateway):
    """The official client; a JPEG declared as image/png goes out with its real type."""
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("oai-viewer", "pictures")
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 90, 200)).save(buf, format="JPEG")
    client = openai.AsyncOpenAI(base_url=gw.http_url + "/v1", api_key=key)
    out = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(buf.getvalue())}},
                    {"type": "text", "text": "How many shapes?"},
                ],
            }
        ],
        max_tokens=8,
    )
    await client.close()
    assert out.choices[0].message.content == b.expected_reply("<image>\nHow many shapes?")
    (msg,) = b.requests[0].messages.messages
    assert msg.content == "<image>\nHow many shapes?"
    assert msg.images[0].mime_type == "image/jpeg"


async def test_grpc_chat_with_images(vision_gateway):
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("grpc-viewer", "pictures")
    req = cpb.ChatRequest(
        messages=[
            cpb.Message(
                role="user",
                content="Compare <image> and <image>",
                images=[cpb.MessageImage(data=png(), mime_type="image/png")] * 2,
            )
        ],
        max_tokens=8,
    )
    out = await grpc_chat(gw, key, req)
    assert out[-1].finish_reason == "stop"
    (msg,) = b.requests[0].messages.messages
    assert msg.content == "Compare <image> and <image>" and len(msg.images) == 2
    # Pictures attached without markers go first, one per line.
    req = cpb.ChatRequest(
        messages=[
            cpb.Message(role="user", content="What is it?", images=[cpb.MessageImage(data=png())])
        ],
        max_tokens=8,
    )
    await grpc_chat(gw, key, req)
    assert b.requests[1].messages.messages[0].content == "<image>\nWhat is it?"


# --- must-show: bad pictures, each a 400 naming what to fix, nothing charged ---------------

BAD_HTTP = [
    (
        "broken base64",
        ask("hi", image_part("data:image/png;base64,iVBORw0KGgo$$$not base64")),
        "base64",
        "messages.0.content.1.image_url.url",
    ),
    (
        "non-image bytes",
        ask("hi", image_part(data_url(b"%PDF-1.4 this is a document, not a picture"))),
        "PNG, JPEG, WebP or GIF",
        "messages.0.content.1.image_url.url",
    ),
    (
        "100-megapixel PNG",
        ask("hi", image_part(data_url(png_claiming(10_000, 10_000)))),
        "10000x10000 = 100000000 pixels",
        "messages.0.content.1.image_url.url",
    ),
    (
        "20 images in one message",
        ask("hi", *[image_part(data_url(png())) for _ in range(20)]),
        "carries 20 images; at most 4",
        "messages.0.content",
    ),
    (
        "http URL",
        ask("hi", image_part("http://images.example.com/cat.png")),
        "data:image/png;base64",
        "messages.0.content.1.image_url.url",
    ),
    (
        "https URL",
        ask("hi", image_part("https://127.0.0.2/cat.png")),
        "does not fetch images",
        "messages.0.content.1.image_url.url",
    ),
    (
        "literal marker in the text",
        ask("what does <image> mean in HTML?", image_part(data_url(png()))),
        "remove it from the text",
        "messages.0.content",
    ),
    (
        "a picture in a system message",
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": [image_part(data_url(png()))]},
                {"role": "user", "content": "hi"},
            ],
        },
        "only user messages may carry images",
        "messages.0.content.0.image_url.url",
    ),
    (
        "not a data URL",
        ask("hi", image_part("data:image/png,rawbytes")),
        "without ';base64'",
        "messages.0.content.1.image_url.url",
    ),
]


@pytest.mark.parametrize("body,says,param", [c[1:] for c in BAD_HTTP], ids=[c[0] for c in BAD_HTTP])
async def test_bad_pictures_refused_before_any_work(vision_gateway, body, says, param):
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("bad-pictures", "pictures")
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"], err
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    # Refused before admission: no model-plane call, nothing charged, not even the request.
    assert b.requests == [] and b.tokenize_calls == 0
    charged, usage = tokens_used(gw, key)
    assert charged == 0
    assert usage["requests_per_minute"]["remaining"] == 1000


async def test_picture_damaged_past_its_header_refunds_every_token(vision_gateway):
    """A PNG whose header is fine but whose data is cut: found by the full decode after
    admission, before any model-plane call. The request stays counted, every token reserved
    is given back."""
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("cut-picture", "pictures")
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noisy, format="PNG")
    cut = noisy.getvalue()[: len(noisy.getvalue()) // 2]
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post(
            "/v1/chat/completions", headers=auth(key), json=ask("hi", image_part(data_url(cut)))
        )
    assert r.status_code == 400, r.text
    assert "damaged or truncated" in r.json()["error"]["message"]
    assert b.requests == [] and b.tokenize_calls == 0
    charged, usage = tokens_used(gw, key)
    assert charged == 0
    assert usage["requests_per_minute"]["remaining"] == 999  # the request itself counted


GRPC_BAD = [
    ("broken bytes", [cpb.MessageImage(data=b"\x89PNG\r\n\x1a\ngarbage")], "PNG, JPEG, WebP or GIF"),
    ("non-image bytes", [cpb.MessageImage(data=b"hello world")], "PNG, JPEG, WebP or GIF"),
    ("100-megapixel PNG", [cpb.MessageImage(data=png_claiming(10_000, 10_000))], "100000000 pixels"),
    ("20 images", [cpb.MessageImage(data=png())] * 20, "carries 20 images; at most 4"),
    ("empty image", [cpb.MessageImage()], "empty"),
]  # fmt: skip


@pytest.mark.parametrize("images,says", [c[1:] for c in GRPC_BAD], ids=[c[0] for c in GRPC_BAD])
async def test_grpc_bad_pictures_invalid_argument_nothing_charged(vision_gateway, images, says):
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("grpc-bad-pictures", "pictures")
    req = cpb.ChatRequest(messages=[cpb.Message(role="user", content="hi", images=images)])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await grpc_chat(gw, key, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in e.value.details()
    assert "messages.0" in e.value.details() or "messages[0]" in e.value.details()
    assert b.requests == [] and b.tokenize_calls == 0
    assert tokens_used(gw, key)[0] == 0


async def test_grpc_marker_count_must_match(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("grpc-markers", "pictures")
    req = cpb.ChatRequest(
        messages=[
            cpb.Message(
                role="user", content="<image> <image> two?", images=[cpb.MessageImage(data=png())]
            )
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await grpc_chat(gw, key, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "<image>" in e.value.details()
    assert gw.backend.requests == []


async def test_text_only_model_refuses_pictures_naming_it(gateway: ThreadedGateway):
    key = gateway.create_key("text-only", "budget")
    body = {**ask("hi", image_part(data_url(png()))), "model": "dsv2-scripted"}
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert "'dsv2-scripted' does not accept images" in err["message"]
    assert err["code"] == "images_not_supported"
    req = cpb.ChatRequest(
        messages=[cpb.Message(role="user", content="hi", images=[cpb.MessageImage(data=png())])]
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await grpc_chat(gateway, key, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'dsv2-scripted' does not accept images" in e.value.details()
    assert gateway.backend.requests == [] and gateway.backend.tokenize_calls == 0
    # To a text-only model "<image>" is ordinary text.
    plain = {
        "model": "dsv2-scripted",
        "messages": [{"role": "user", "content": "what is <image> in HTML?"}],
    }
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=plain)
    assert r.status_code == 200, r.text


async def test_marker_written_by_the_model_is_neutralised(vision_gateway):
    """An assistant message relayed by the client may hold "<image>" (the model wrote it): it
    reaches the model plane as text that cannot be taken for a picture's place."""
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("relay", "pictures")
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [image_part(data_url(png())), {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "It shows an <image> tag."},
            {"role": "user", "content": "and?"},
        ],
        "max_tokens": 4,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=body)
    assert r.status_code == 200, r.text
    sent = b.requests[0].messages.messages
    assert sent[0].content.count("<image>") == 1 and len(sent[0].images) == 1
    assert "<image>" not in sent[1].content and "image> tag" in sent[1].content


async def test_too_many_pictures_per_request(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("many", "internal")
    msgs = []
    for _ in range(3):
        parts = [image_part(data_url(png())) for _ in range(3)]
        msgs += [{"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}]
    body = {"model": MODEL, "messages": msgs[:-1]}
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=body)
    assert r.status_code == 400
    assert "carries 9 images; at most 8 per request" in r.json()["error"]["message"]


# --- allow-listed URLs ---------------------------------------------------------------------


class _Pictures(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, b"no such picture"))
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        if status == 302:
            self.send_header("Location", "http://127.0.0.1:1/elsewhere.png")
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the gateway stops reading past its cap
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def picture_server() -> Iterator[str]:
    """A local HTTP server (127.0.0.1, the test gateway's allow-list) serving pictures."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pictures)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def test_allow_listed_url_is_fetched(vision_gateway, picture_server):
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("fetcher", "pictures_many")
    picture = png((10, 200, 10))
    _Pictures.routes = {
        "/cat.png": (200, picture),
        "/huge.png": (200, b"\x89PNG" + b"\x00" * (gw.settings.max_image_bytes + 10)),
        "/moved.png": (302, b""),
        "/text": (200, b"just text"),
    }
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post(
            "/v1/chat/completions",
            headers=auth(key),
            json=ask("what?", image_part(f"{picture_server}/cat.png")),
        )
        assert r.status_code == 200, r.text
        assert b.requests[0].messages.messages[0].images[0].data == picture
        # The same URL twice: fetched twice, decoded once, both sent whole.
        twice = ask("x", *[image_part(f"{picture_server}/cat.png")] * 2)
        r = await c.post("/v1/chat/completions", headers=auth(key), json=twice)
        assert r.status_code == 200, r.text
        sent = b.requests[1].messages.messages[0].images
        assert [(i.data, i.mime_type) for i in sent] == [(picture, "image/png")] * 2
        for path, says in [
            ("/missing.png", "HTTP 404"),
            ("/huge.png", f"at most {gw.settings.max_image_bytes} bytes"),
            ("/moved.png", "HTTP 302"),
            ("/text", "PNG, JPEG, WebP or GIF"),
        ]:
            r = await c.post(
                "/v1/chat/completions",
                headers=auth(key),
                json=ask("what?", image_part(picture_server + path)),
            )
            assert r.status_code == 400, (path, r.text)
            assert says in r.json()["error"]["message"], path
        # The same server under a name that is not on the allow-list.
        other = picture_server.replace("127.0.0.1", "localhost")
        r = await c.post(
            "/v1/chat/completions", headers=auth(key), json=ask("x", image_part(other + "/cat.png"))
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_url_not_allowed"
    assert len(b.requests) == 2
    # Fetch failures come after admission: requests counted, no token kept.
    charged, _ = tokens_used(gw, key)
    # The two answered requests, as the scripted plane counts them.
    assert charged == (3 + 2 + 50 + 2) + 8 + (3 + 3 + 100 + 2) + 8


# --- sessions keep their pictures ----------------------------------------------------------


async def test_session_keeps_pictures_and_returns_them_as_parts(vision_gateway):
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("album", "pictures")
    first, second = png((255, 0, 0)), png((0, 0, 255), (30, 30))
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        parts = [{"type": "text", "text": "What colour?"}, image_part(data_url(first))]
        async with c.stream(
            "POST", f"/v1/sessions/{sid}/messages", json={"content": parts}
        ) as resp:
            assert resp.status_code == 200
            events = await read_sse(resp)
        assert events[-1]["type"] == "done" and events[-1]["message_id"]
        async with c.stream(
            "POST",
            f"/v1/sessions/{sid}/messages",
            json={"content": [image_part(data_url(second)), {"type": "text", "text": "And now?"}]},
        ) as resp:
            await read_sse(resp)
        async with c.stream(
            "POST", f"/v1/sessions/{sid}/messages", json={"content": "thanks"}
        ) as resp:
            await read_sse(resp)
        got = (await c.get(f"/v1/sessions/{sid}")).json()
    contents = [m["content"] for m in got["messages"]]
    assert contents[0] == [{"type": "text", "text": "What colour?"}, image_part(data_url(first))]
    assert contents[2] == [image_part(data_url(second)), {"type": "text", "text": "And now?"}]
    assert contents[4] == "thanks"
    assert isinstance(contents[1], str)
    # Every turn sends the conversation's pictures with their messages.
    last = b.requests[-1].messages.messages
    assert [len(m.images) for m in last] == [1, 0, 1, 0, 0]
    assert last[0].images[0].data == first and last[2].images[0].data == second
    # Stored once per session, with the session's TTL.
    r = redis.Redis.from_url(gw.settings.redis_url)
    prefix = gw.settings.redis_key_prefix
    assert r.hlen(f"{prefix}sess:{sid}:imgs") == 2
    ttl_meta, ttl_imgs = r.ttl(f"{prefix}sess:{sid}"), r.ttl(f"{prefix}sess:{sid}:imgs")
    assert ttl_imgs > 0 and abs(ttl_meta - ttl_imgs) <= 1
    # Deleting the session deletes its pictures.
    with httpx.Client(base_url=gw.http_url, headers=auth(key)) as c:
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
    assert r.exists(f"{prefix}sess:{sid}:imgs") == 0
    r.close()


async def test_grpc_session_turn_and_get_session_with_images(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("grpc-album", "pictures")
    picture = png((1, 2, 3))
    async with grpc.aio.insecure_channel(gw.grpc_target) as ch:
        stub = chat_pb2_grpc.ChatStub(ch)
        s = await stub.CreateSession(cpb.CreateSessionRequest(), metadata=md(key))
        req = cpb.ChatRequest(
            session_id=s.id,
            messages=[
                cpb.Message(
                    role="user",
                    content="Which number?",
                    images=[cpb.MessageImage(data=picture, mime_type="image/png")],
                )
            ],
        )
        out = [r async for r in stub.Chat(req, metadata=md(key))]
        assert out[-1].message_id
        got = await stub.GetSession(cpb.GetSessionRequest(session_id=s.id), metadata=md(key))
    user, reply = got.messages
    assert user.content == "<image>\nWhich number?"
    assert [(i.data, i.mime_type) for i in user.images] == [(picture, "image/png")]
    assert list(reply.images) == []


async def test_session_picture_bytes_are_capped(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("small-album", "small_album")  # 2000 bytes of pictures per session
    big = io.BytesIO()
    Image.effect_noise((24, 24), 80).convert("RGB").save(big, format="PNG")  # ~1.7 kB
    assert 1000 < len(big.getvalue()) < 2000
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        turn = {"content": [image_part(data_url(big.getvalue())), {"type": "text", "text": "a"}]}
        async with c.stream("POST", f"/v1/sessions/{sid}/messages", json=turn) as resp:
            assert resp.status_code == 200
            await read_sse(resp)
        other = io.BytesIO()
        Image.effect_noise((24, 24), 90).convert("RGB").save(other, format="PNG")
        turn = {"content": [image_part(data_url(other.getvalue())), {"type": "text", "text": "b"}]}
        r = await c.post(f"/v1/sessions/{sid}/messages", json=turn)
        assert r.status_code == 409
        assert "limit of 2000 bytes of images per session" in r.json()["error"]["message"]
        # Text still fits.
        async with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "c"}) as resp:
            assert resp.status_code == 200


async def test_session_turn_bad_picture_names_the_content_part(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("album-bad", "pictures")
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        turn = {"content": [{"type": "text", "text": "hi"}, image_part("data:image/png;base64,@@")]}
        r = await c.post(f"/v1/sessions/{sid}/messages", json=turn)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "content.1.image_url.url"
        assert (await c.get(f"/v1/sessions/{sid}")).json()["messages"] == []
    assert gw.backend.requests == []


async def test_old_pictures_leave_the_prompt_past_the_per_request_cap(vision_gateway):
    """A session may hold more pictures than one request may carry: the oldest messages are
    left out of the prompt, as for the context window."""
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("long-album", "internal")
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        for i in range(3):
            parts = [image_part(data_url(png((i, i, i)))) for _ in range(3)]
            parts.append({"type": "text", "text": f"turn {i}"})
            async with c.stream(
                "POST", f"/v1/sessions/{sid}/messages", json={"content": parts}
            ) as resp:
                assert resp.status_code == 200
                await read_sse(resp)
    sent = b.requests[-1].messages.messages
    assert sum(len(m.images) for m in sent) == 6  # turns 1 and 2; turn 0 left out
    assert sent[0].role == "assistant" and sent[1].content.endswith("turn 1")
    # The scripted reply echoed "<image>": in the history it is text, not a picture's place.
    assert "<image>" not in sent[0].content and "image>" in sent[0].content


# --- quotas ----------------------------------------------------------------------------------


async def test_images_per_day_is_enforced_and_named(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("daily-pictures", "pictures")  # 3 pictures a day
    two = ask("two?", image_part(data_url(png())), image_part(data_url(png((1, 1, 1)))))
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=two)
        assert r.status_code == 200, r.text
        r = await c.post("/v1/chat/completions", headers=auth(key), json=two)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "images_per_day"
        assert "3 images per day (1 left, this request carries 2" in err["message"]
        assert int(r.headers["retry-after"]) > 0
        one = ask("one?", image_part(data_url(png())))
        assert (
            await c.post("/v1/chat/completions", headers=auth(key), json=one)
        ).status_code == 200
        usage = (await c.get("/v1/usage", headers=auth(key))).json()
        assert usage["images_per_day"]["limit"] == 3
        assert usage["images_per_day"]["remaining"] == 0
        text = {"model": MODEL, "messages": [{"role": "user", "content": "text is fine"}]}
        assert (
            await c.post("/v1/chat/completions", headers=auth(key), json=text)
        ).status_code == 200
    assert len(gw.backend.requests) == 3
    async with grpc.aio.insecure_channel(gw.grpc_target) as ch:
        usage = await chat_pb2_grpc.ChatStub(ch).GetUsage(cpb.UsageRequest(), metadata=md(key))
    assert (usage.images_per_day.limit, usage.images_per_day.remaining) == (3, 0)


async def test_picture_tokens_are_reserved_and_settled_exactly(vision_gateway):
    """The reservation bounds each picture by ModelInfoResponse.max_image_tokens (60 here);
    the model plane's count (50 each) is what stays charged."""
    gw = vision_gateway
    key = gw.create_key("picture-tokens", "pictures")
    body = ask("a b", image_part(data_url(png())), image_part(data_url(png((3, 3, 3)))))
    body["max_tokens"] = 8
    gw.backend.delay_s = 0.3  # hold the turn open to see the reservation
    try:
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
            task = asyncio.ensure_future(
                c.post("/v1/chat/completions", headers=auth(key), json=body)
            )
            await asyncio.sleep(0.5)
            held, _ = tokens_used(gw, key)
            r = await task
    finally:
        gw.backend.delay_s = 0.0
    assert r.status_code == 200
    content = "a b\n<image>\n<image>"
    text_bound = len(content.encode()) + 32 + 32
    assert held == text_bound + 2 * 60 + 8
    charged, _ = tokens_used(gw, key)
    assert charged == r.json()["usage"]["total_tokens"] == (3 + 4 + 100 + 2) + 8


async def test_idempotent_retry_compares_the_pictures_too(vision_gateway):
    gw = vision_gateway
    key = gw.create_key("retry-album", "pictures_many")
    headers = {**auth(key), "Idempotency-Key": "turn-1"}
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers=headers) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        turn = {"content": [image_part(data_url(png((5, 5, 5)))), {"type": "text", "text": "x"}]}
        async with c.stream("POST", f"/v1/sessions/{sid}/messages", json=turn) as resp:
            await read_sse(resp)
        async with c.stream("POST", f"/v1/sessions/{sid}/messages", json=turn) as resp:
            events = await read_sse(resp)
        assert events[-1]["replayed"] is True  # same text, same picture: replayed
        other = {"content": [image_part(data_url(png((6, 6, 6)))), {"type": "text", "text": "x"}]}
        r = await c.post(f"/v1/sessions/{sid}/messages", json=other)
        assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert len(gw.backend.requests) == 1


async def test_evicted_pictures_leave_their_messages_readable(vision_gateway):
    """The sessions Redis may evict a session's picture hash under memory pressure (LRU): the
    session still reads and takes turns; the lost pictures are left out with their markers."""
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("evicted-album", "pictures_many")
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers=auth(key)) as c:
        sid = (await c.post("/v1/sessions", json={})).json()["id"]
        turn = {"content": [{"type": "text", "text": "see"}, image_part(data_url(png()))]}
        async with c.stream("POST", f"/v1/sessions/{sid}/messages", json=turn) as resp:
            await read_sse(resp)
        r = redis.Redis.from_url(gw.settings.redis_url)
        r.delete(f"{gw.settings.redis_key_prefix}sess:{sid}:imgs")
        r.close()
        got = (await c.get(f"/v1/sessions/{sid}")).json()
        assert got["messages"][0]["content"] == [{"type": "text", "text": "see"}]
        async with c.stream(
            "POST", f"/v1/sessions/{sid}/messages", json={"content": "more"}
        ) as resp:
            assert resp.status_code == 200
            events = await read_sse(resp)
        assert events[-1]["type"] == "done" and "error" not in events[-1]
    first = b.requests[-1].messages.messages[0]
    assert first.content == "see\n" and list(first.images) == []


async def test_bare_string_image_url_accepted(vision_gateway):
    """Some older clients send "image_url": "<url>" rather than {"url": "<url>"}."""
    gw = vision_gateway
    key = gw.create_key("bare-url", "pictures_many")
    body = ask("what?", {"type": "image_url", "image_url": data_url(png())})
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth(key), json=body)
    assert r.status_code == 200, r.text
    assert len(gw.backend.requests[0].messages.messages[0].images) == 1


@pytest.mark.parametrize("name", ["text-only model", "broken picture", "no url"])
async def test_fast_lane_and_routing_answer_pictures_alike(gateway, routing_gateway, name):
    """The fast lane and FastAPI's routing parse content parts with the same model and give the
    same refusals (both text-only here: the picture refusal comes first)."""
    from tests.gateway.test_fast_lane import _normal

    key = gateway.create_key("lanes-pictures", "internal")
    part = {
        "text-only model": image_part(data_url(png())),
        "broken picture": image_part("data:image/png;base64,@@"),
        "no url": {"type": "image_url", "image_url": {}},
    }[name]
    body = {**ask("hi", part), "model": "dsv2-scripted"}
    answers = []
    for gw in (gateway, routing_gateway):
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as c:
            answers.append(await c.post("/v1/chat/completions", headers=auth(key), json=body))
    assert answers[0].status_code == 400, answers[0].text
    assert _normal(answers[0]) == _normal(answers[1])


async def test_pictures_larger_than_the_text_limits_fit_both_apis(vision_gateway):
    """A 5 MB picture: over the text body limit (DSV2_MAX_BODY_BYTES, 1 MB) and over gRPC's
    default 4 MiB message limit, yet within the image caps, so both APIs take it."""
    gw, b = vision_gateway, vision_gateway.backend
    key = gw.create_key("big-picture", "pictures_many")
    buf = io.BytesIO()
    noise = random.Random(0).randbytes(1400 * 1200 * 3)  # incompressible
    Image.frombytes("RGB", (1400, 1200), noise).save(buf, format="PNG", compress_level=1)
    picture = buf.getvalue()
    assert 4.5 * 2**20 < len(picture) < gw.settings.max_image_bytes
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=60) as c:
        r = await c.post(
            "/v1/chat/completions",
            headers=auth(key),
            json=ask("big?", image_part(data_url(picture))),
        )
    assert r.status_code == 200, r.text[:300]
    req = cpb.ChatRequest(
        messages=[cpb.Message(role="user", content="big?", images=[cpb.MessageImage(data=picture)])]
    )
    out = await grpc_chat(gw, key, req)
    assert out[-1].finish_reason == "stop"
    assert [len(r.messages.messages[0].images[0].data) for r in b.requests] == [len(picture)] * 2
