"""Pictures in chat messages, shared by HTTP (OpenAI `image_url` content parts) and gRPC
(`Message.images`): where they come from, the checks they pass, and the wire format they go out
in (inference.proto: `ChatMessage.content` with one `<image>` marker per entry of
`ChatMessage.images`, in order).

Two stages, so that a refused picture costs nothing and an accepted one costs work only once
its request is admitted:
1. `check_images`, before quota admission: counts per message and per request, the model
   accepts pictures at all, data URLs well formed, and each picture's format and pixel count
   read from its header alone (`model.image_input.probe_image`: a 10000 x 10000 PNG is refused
   having read a few dozen bytes). http(s) URLs are refused here unless their host is on the
   allow-list (Settings.image_url_hosts).
2. `ImageResolver.resolve`, after admission: allow-listed URLs fetched (size-capped, with a
   timeout), then every picture decoded in full (`decode_image`, in a worker thread), so a
   file whose header is fine but whose data is not is refused before any model-plane call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from model.image_input import ImageInputError, ImageLimits, decode_image, probe_image
from services.gateway.core.errors import InvalidInput
from services.gateway.core.validation import Limits
from services.rpc.dsv2.v1 import inference_pb2 as pb

# Where a picture sits in a message's text: model/vl2_prompt.py's IMAGE_PLACEHOLDER (the same
# string; the gateway does not import the model's prompt code).
IMAGE_PLACEHOLDER = "<image>"

_DATA_URL_RE = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.A)
_HOW = "send the picture as a data URL: data:image/png;base64,<base64 of the file>"


def image_limits(limits: Limits) -> ImageLimits:
    return ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)


@dataclass
class ImageRef:
    """One picture of a request: which message and which of its images, the request field to
    name in errors, and the URL to fetch after admission ("" when its bytes came inline)."""

    message: int
    index: int
    param: str
    url: str = ""


@dataclass
class ImageParts:
    """What a message's content parts become: the text with one marker per picture, the
    pictures for the wire (data empty until an URL is fetched) and their refs."""

    content: str
    images: list[pb.Image] = field(default_factory=list)
    refs: list[ImageRef] = field(default_factory=list)


def decode_data_url(url: str, param: str, limits: Limits) -> bytes:
    """The bytes of a `data:<type>;base64,<data>` URL; InvalidInput saying what is wrong."""
    m = _DATA_URL_RE.match(url)
    if m is None:
        raise InvalidInput(f"{param} is not a data URL; {_HOW}.", param=param, code="invalid_image")
    mime, _, b64 = m.groups()
    if mime and not mime.lower().startswith("image/"):
        raise InvalidInput(
            f"{param} is a data URL of type {mime}, not an image; {_HOW}.",
            param=param,
            code="invalid_image",
        )
    if not b64:
        raise InvalidInput(
            f"{param} is a data URL without ';base64'; {_HOW}.", param=param, code="invalid_image"
        )
    payload = url[m.end() :]
    # Refused by its length before decoding anything: base64 takes 4 characters per 3 bytes.
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise InvalidInput(
            f"{param}: the image is about {len(payload) // 4 * 3} bytes; at most "
            f"{limits.max_image_bytes} bytes per image are accepted. Send a smaller file.",
            param=param,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(
            f"{param}: the data URL's base64 is broken ({e}); send standard base64 "
            "(A-Z, a-z, 0-9, +, /, padded with =) of the whole file.",
            param=param,
            code="invalid_image",
        ) from None
    if not data:
        raise InvalidInput(
            f"{param}: the data URL holds no bytes; {_HOW}.", param=param, code="invalid_image"
        )
    return data


def check_image_url(url: str, param: str, allowed_hosts: frozenset[str]) -> str:
    """An http(s) URL whose host is on the allow-list, else InvalidInput. Returns the URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidInput(
            f"{param}: only data: URLs are accepted for images (got a {scheme or 'relative'} "
            f"URL); {_HOW}.",
            param=param,
            code="invalid_image_url",
        )
    host = (parts.hostname or "").lower().rstrip(".")
    if host not in allowed_hosts or parts.username or parts.password:
        raise InvalidInput(
            f"{param}: this server does not fetch images from {scheme} URLs"
            + (f" on host {host!r}" if allowed_hosts else "")
            + f"; {_HOW}.",
            param=param,
            code="image_url_not_allowed",
        )
    return url


def image_from_url(
    url: str, param: str, limits: Limits, allowed_hosts: frozenset[str]
) -> tuple[pb.Image, str]:
    """(the wire image, URL to fetch later or "") of one image URL as a client sent it."""
    if url[:5].lower() == "data:":
        return pb.Image(data=decode_data_url(url, param, limits)), ""
    return pb.Image(), check_image_url(url, param, allowed_hosts)


def join_parts(pieces: Sequence[str | None]) -> str:
    """Text pieces and pictures (None) in order -> the message text with one marker per
    picture. A marker gets a newline after it when text follows (DeepSeek-VL2's own layout
    is "<image>\\n{question}"), and text before a marker a newline when it has none."""
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            if out and not out[-1].endswith(("\n", " ")):
                out.append("\n")
            out.append(IMAGE_PLACEHOLDER)
            if i + 1 < len(pieces) and pieces[i + 1] is not None:
                nxt = pieces[i + 1]
                if nxt and not nxt.startswith("\n"):
                    out.append("\n")
        else:
            out.append(piece)
    return "".join(out)


def split_parts(content: str, images: Sequence[tuple[str, bytes] | None]) -> list[dict] | str:
    """The inverse for clients: stored text + its pictures (mime type, bytes; None for one no
    longer stored) -> OpenAI content parts with data URLs; a message without pictures stays a
    plain string."""
    if not images:
        return content
    pieces = content.split(IMAGE_PLACEHOLDER)
    parts: list[dict] = []
    for i, text in enumerate(pieces):
        if i > 0:
            text = text.removeprefix("\n")
        if i + 1 < len(pieces):
            text = text.removesuffix("\n")
        if text:
            parts.append({"type": "text", "text": text})
        if i < len(images) and i + 1 < len(pieces) and images[i] is not None:
            mime, data = images[i]
            url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def images_not_supported(model_id: str, param: str) -> InvalidInput:
    return InvalidInput(
        f"The model {model_id!r} does not accept images (it reads text only); remove the "
        "image parts or use a model that reads pictures.",
        param=param,
        code="images_not_supported",
    )


def markers_in(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def check_images(
    messages: Sequence[pb.ChatMessage],
    refs: Sequence[ImageRef],
    limits: Limits,
    info: pb.ModelInfoResponse,
    *,
    earlier_images: int = 0,
    field: str = "",
) -> None:
    """Everything about the pictures that can be checked before admission (see the module
    docstring). `earlier_images`: pictures the request carries from a stored session; `field`:
    the request field of a lone message (a session turn's "content"), named in errors."""

    def name(i: int) -> tuple[str, str]:  # (in a message, as a param)
        return (field, field) if field else (f"messages[{i}]", f"messages.{i}.content")

    if not refs:
        if info.accepts_images:
            _refuse_stray_markers(messages, refs, name)
        return
    if not info.accepts_images:
        raise images_not_supported(info.model_id, refs[0].param)
    per_message: dict[int, int] = {}
    for ref in refs:
        per_message[ref.message] = per_message.get(ref.message, 0) + 1
        if messages[ref.message].role != "user":
            raise InvalidInput(
                f"{ref.param}: only user messages may carry images (this one is "
                f"{messages[ref.message].role!r}).",
                param=ref.param,
                code="invalid_image",
            )
    for i, n in per_message.items():
        if n > limits.max_images_per_message:
            where, param = name(i)
            raise InvalidInput(
                f"{where} carries {n} images; at most {limits.max_images_per_message} "
                "images per message are accepted. Send fewer pictures (or split them over "
                "several messages).",
                param=param,
                code="too_many_images",
            )
    total = len(refs) + earlier_images
    if total > limits.max_images_per_request:
        raise InvalidInput(
            f"The request carries {total} images; at most {limits.max_images_per_request} "
            "per request are accepted. Send fewer pictures.",
            param="messages",
            code="too_many_images",
        )
    _refuse_stray_markers(messages, refs, name)
    ilimits = image_limits(limits)
    size = 0
    for ref in refs:
        image = messages[ref.message].images[ref.index]
        if ref.url:
            continue  # fetched after admission, and checked then
        size += len(image.data)
        if size > limits.max_image_request_bytes:
            raise InvalidInput(
                f"The request's images are more than {limits.max_image_request_bytes} bytes "
                "together, the limit per request; send fewer or smaller pictures.",
                param=ref.param,
                code="image_too_large",
            )
        try:
            image.mime_type = probe_image(image.data, ilimits).mime_type
        except ImageInputError as e:
            raise InvalidInput(f"{ref.param}: {e}.", param=ref.param, code="invalid_image") from e


def neutralise_markers(text: str) -> str:
    """Text that must reach the model as text: each `<image>` gets a zero-width space inside,
    so it can never be taken for a picture's place (for replies the model wrote itself)."""
    return text.replace(IMAGE_PLACEHOLDER, "<\u200bimage>")


def _refuse_stray_markers(
    messages: Sequence[pb.ChatMessage],
    refs: Sequence[ImageRef],
    name: Callable[[int], tuple[str, str]],
) -> None:
    """The text `<image>` marks where a picture goes; a client writing it itself would shift
    every picture after it onto the wrong place. In user and system text it is refused (the
    client can fix it); in assistant text, which the model wrote and the client only relays,
    it is neutralised. For a model that reads pictures only: to a text-only model it is
    ordinary text."""
    counts: dict[int, int] = {}
    for ref in refs:
        counts[ref.message] = counts.get(ref.message, 0) + 1
    for i, m in enumerate(messages):
        if m.role == "assistant" and not counts.get(i):
            m.content = neutralise_markers(m.content)
            continue
        if markers_in(m.content) != counts.get(i, 0):
            where, param = name(i)
            raise InvalidInput(
                f"{where} contains the text {IMAGE_PLACEHOLDER!r}, which marks where a "
                "picture goes; remove it from the text (send pictures as image parts).",
                param=param,
                code="invalid_text",
            )


class ImageResolver:
    """Stage 2 (after admission): fetch allow-listed URLs, decode every picture."""

    def __init__(self, limits: Limits, *, timeout_s: float = 5.0) -> None:
        self.limits = limits
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def resolve(self, messages: Sequence[pb.ChatMessage], refs: Sequence[ImageRef]) -> None:
        """Fill in fetched bytes and check that every picture decodes; InvalidInput naming
        the picture otherwise. Each distinct file is decoded once."""
        ilimits = image_limits(self.limits)
        total = sum(len(messages[r.message].images[r.index].data) for r in refs if not r.url)
        for ref in refs:
            if ref.url:
                image = messages[ref.message].images[ref.index]
                image.data = await self._fetch(ref.url, ref.param)
                total += len(image.data)
                if total > self.limits.max_image_request_bytes:
                    raise InvalidInput(
                        f"The request's images are more than {self.limits.max_image_request_bytes}"
                        " bytes together, the limit per request; send fewer or smaller pictures.",
                        param=ref.param,
                        code="image_too_large",
                    )
        checked: dict[bytes, str] = {}  # file -> its MIME type, once decoded
        for ref in refs:
            image = messages[ref.message].images[ref.index]
            if image.data not in checked:
                try:
                    info = probe_image(image.data, ilimits)
                    # Decoding a large picture takes tens of ms of CPU: off the event loop.
                    await asyncio.to_thread(decode_image, image.data, ilimits)
                except ImageInputError as e:
                    raise InvalidInput(
                        f"{ref.param}: {e}.", param=ref.param, code="invalid_image"
                    ) from e
                checked[image.data] = info.mime_type
            image.mime_type = checked[image.data]

    async def _fetch(self, url: str, param: str) -> bytes:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False)
        cap = self.limits.max_image_bytes

        def refuse(why: str, code: str = "image_fetch_failed") -> InvalidInput:
            return InvalidInput(f"{param}: {why}", param=param, code=code)

        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise refuse(
                            f"fetching the image URL answered HTTP {resp.status_code}; send a "
                            "URL that serves the picture directly (redirects are not followed), "
                            "or the picture as a data URL."
                        )
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > cap:
                        raise refuse(
                            f"the image at the URL is {declared} bytes; at most {cap} bytes per "
                            "image are accepted.",
                            "image_too_large",
                        )
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > cap:
                            raise refuse(
                                f"the image at the URL is over {cap} bytes, the limit per image.",
                                "image_too_large",
                            )
                        chunks.append(chunk)
        except TimeoutError:
            raise refuse(
                f"the image URL did not deliver the picture within {self.timeout_s:g} s; send "
                "the picture as a data URL."
            ) from None
        except httpx.HTTPError as e:
            raise refuse(
                f"the image URL could not be fetched ({type(e).__name__}); send the picture "
                "as a data URL."
            ) from None
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def message_from_parts(
    index: int,
    role: str,
    pieces: Sequence[str | None],
    urls: Sequence[str],
    params: Sequence[str],
    limits: Limits,
    allowed_hosts: frozenset[str],
    field: str = "",
) -> tuple[pb.ChatMessage, list[ImageRef]]:
    """HTTP: one message's content parts (text pieces, None per picture, in order; the
    pictures' URLs and field names) -> the wire message and its image refs. Cheap checks only
    (data URLs decoded from base64, URLs against the allow-list); the rest is check_images'."""
    msg = pb.ChatMessage(role=role, content=join_parts(pieces))
    refs: list[ImageRef] = []
    for j, (url, param) in enumerate(zip(urls, params, strict=True)):
        if j >= limits.max_images_per_message:  # refused by count before decoding them all
            raise InvalidInput(
                f"{field or f'messages[{index}]'} carries {len(urls)} images; at most "
                f"{limits.max_images_per_message} images per message are accepted. Send fewer "
                "pictures (or split them over several messages).",
                param=field or f"messages.{index}.content",
                code="too_many_images",
            )
        image, fetch = image_from_url(url, param, limits, allowed_hosts)
        msg.images.append(image)
        refs.append(ImageRef(message=index, index=j, param=param, url=fetch))
    return msg, refs


def message_from_wire(
    index: int, role: str, content: str, images: Sequence[tuple[bytes, str]], param: str
) -> tuple[pb.ChatMessage, list[ImageRef]]:
    """gRPC: a message with its images (bytes, declared mime type). Its content holds one
    `<image>` per image; a content without any gets them in front, one per line (DeepSeek-VL2's
    own layout), so a client may simply attach pictures to a question."""
    if images and markers_in(content) == 0:
        content = (IMAGE_PLACEHOLDER + "\n") * len(images) + content
    msg = pb.ChatMessage(role=role, content=content)
    refs = []
    for j, (data, mime) in enumerate(images):
        msg.images.append(pb.Image(data=data, mime_type=mime))
        refs.append(ImageRef(message=index, index=j, param=f"{param}.images.{j}"))
    return msg, refs
