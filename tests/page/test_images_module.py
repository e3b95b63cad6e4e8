"""The page's picture checks (images.js) in the real browser, on files Pillow writes: the
format comes from the bytes (not the name), the size from the header (no decoding), and every
refusal says what is wrong and what to do."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from PIL import Image
from playwright.sync_api import Browser

from services.gateway.http.routes.page import router
from tests.page.server import serve

# Runs `body` with `images` (the module), `file` (a File of the given bytes, name and type)
# and `bytes` in scope; Playwright's evaluate is not subject to the page's CSP, `new Function`
# in the page would be.
CALL = """async ({{ b64, name, type }}) => {{
  const images = await import('/static/images.js');
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const file = new File([bytes], name, {{ type }});
  try {{
    return {{ value: await (async () => {{ {body} }})() }};
  }} catch (error) {{
    return {{ error: error.message, name: error.name }};
  }}
}}"""


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def picture(size: tuple[int, int] = (321, 123), mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, "white" if mode != "P" else 0)
    image.paste("red" if mode == "RGB" else 1, (10, 10, 60, 50))
    return image


@pytest.fixture(scope="module")
def run(browser: Browser) -> Iterator[Callable[..., dict]]:
    app = FastAPI()
    app.include_router(router)
    with serve(app) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/")

        def call(data: bytes, body: str, name: str = "picture", type: str = "") -> dict:
            b64 = base64.b64encode(data).decode()
            return page.evaluate(CALL.format(body=body), {"b64": b64, "name": name, "type": type})

        yield call
        context.close()


FORMATS = {
    "png": (lambda: encode(picture(), "PNG"), "image/png"),
    "png-palette": (lambda: encode(picture(mode="P"), "PNG"), "image/png"),
    "jpeg": (lambda: encode(picture(), "JPEG", quality=80), "image/jpeg"),
    "jpeg-progressive-exif": (
        lambda: encode(picture(), "JPEG", progressive=True, exif=Image.Exif().tobytes()),
        "image/jpeg",
    ),
    "webp-lossy": (lambda: encode(picture(), "WEBP", quality=80), "image/webp"),
    "webp-lossless": (lambda: encode(picture(), "WEBP", lossless=True), "image/webp"),
    "webp-alpha": (lambda: encode(picture(mode="RGBA"), "WEBP", quality=80), "image/webp"),
    "gif": (lambda: encode(picture(mode="P"), "GIF"), "image/gif"),
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_format_and_size_come_from_the_bytes(run, kind: str) -> None:
    data, mime = FORMATS[kind][0](), FORMATS[kind][1]
    # Named and typed as something else: the bytes decide.
    got = run(
        data,
        "return images.readImage(file)",
        name="renamed.txt",
        type="text/plain",
    )
    assert "error" not in got, got
    value = got["value"]
    assert value["type"] == mime
    assert (value["width"], value["height"]) == (321, 123)
    assert value["size"] == len(data)
    assert value["name"] == "renamed.txt"
    # The data URL carries the file unchanged, under the type its bytes say.
    prefix = f"data:{mime};base64,"
    assert value["url"].startswith(prefix)
    assert base64.b64decode(value["url"][len(prefix) :]) == data


@pytest.mark.parametrize(
    "data, name",
    [
        (b"just some text, not a picture\n", "notes.png"),
        (encode(picture(), "BMP"), "old.bmp"),
        (encode(picture(), "TIFF"), "scan.tiff"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "logo.svg"),
    ],
)
def test_other_formats_are_refused_by_name(run, data: bytes, name: str) -> None:
    got = run(data, "return images.readImage(file)", name=name, type="image/png")
    assert got["name"] == "ImageError"
    assert got["error"] == (
        f'"{name}" is not an image the model can read. Use a PNG, JPEG, WebP or GIF image.'
    )


def test_too_many_bytes_is_refused(run) -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(5 * 1024 - 8)
    limits = "{ maxBytes: 2048, maxPixels: 1e9, maxImages: 4 }"
    got = run(data, f"return images.readImage(file, {limits})", name="photo.png")
    assert got["error"] == (
        '"photo.png" is 5 KB; an image can be at most 2 KB. Send a smaller or more compressed one.'
    )
    default = run(
        b"\x89PNG\r\n\x1a\n" + bytes(11 * 1024 * 1024),
        "return images.readImage(file)",
        name="huge.png",
    )
    assert default["error"] == (
        '"huge.png" is 11 MB; an image can be at most 10 MB. Send a smaller or more compressed one.'
    )


def test_a_decompression_bomb_is_refused_from_its_header(run) -> None:
    # 100 megapixels of one colour: a few hundred KB as PNG, 300 MB once decoded.
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(bomb) < 1024 * 1024
    got = run(bomb, "return images.readImage(file)", name="bomb.png")
    assert got["error"] == (
        '"bomb.png" is 10000×10000 pixels (100 megapixels); an image can have at most '
        "16 megapixels. Scale it down and try again."
    )


def test_an_empty_file_is_refused(run) -> None:
    got = run(b"", "return images.readImage(file)", name="empty.png")
    assert got["error"] == '"empty.png" is empty: choose another file.'


def test_content_parts_put_pictures_first_and_keep_text_only_turns_plain(run) -> None:
    got = run(
        b"",
        """return [
          images.turnContent('just words', []),
          images.turnContent('What is this?', [{ url: 'data:image/png;base64,AAAA' },
                                                { url: 'data:image/gif;base64,BBBB' }]),
          images.turnContent('  ', [{ url: 'data:image/png;base64,AAAA' }]),
        ]""",
    )
    assert got["value"] == [
        "just words",
        [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "data:image/gif;base64,BBBB"}},
            {"type": "text", "text": "What is this?"},
        ],
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
    ]


def test_stored_content_shows_only_data_urls_of_the_four_formats(run) -> None:
    got = run(
        b"",
        """return [
          images.splitContent('plain text'),
          images.splitContent([
            { type: 'text', text: 'first' },
            { type: 'image_url', image_url: { url: 'data:image/webp;base64,UklGRg==' } },
            { type: 'image_url', image_url: { url: 'https://example.com/cat.png' } },
            { type: 'image_url', image_url: { url: 'data:image/svg+xml;base64,PHN2Zy8+' } },
            { type: 'image_url', image_url: { url: 'data:text/html;base64,PHNjcmlwdD4=' } },
            { type: 'text', text: 'second' },
          ]),
          images.splitContent(null),
        ]""",
    )
    assert got["value"] == [
        {"text": "plain text", "images": []},
        {"text": "first\nsecond", "images": ["data:image/webp;base64,UklGRg==", None, None, None]},
        {"text": "", "images": []},
    ]


def test_limits_announced_by_the_gateway_replace_the_defaults(run) -> None:
    got = run(
        b"",
        """return [
          images.limitsFrom(null),
          images.limitsFrom({ max_image_bytes: 2048, max_images_per_message: 2,
                              max_image_request_bytes: 4096 }),
          images.limitsFrom({ max_image_bytes: -1, max_image_pixels: 'many' }),
        ]""",
    )
    defaults = {
        "maxBytes": 10 * 1024 * 1024,
        "maxPixels": 16_000_000,
        "maxImages": 4,
        "maxTotalBytes": 16 * 1024 * 1024,
    }
    assert got["value"] == [
        defaults,
        {**defaults, "maxBytes": 2048, "maxImages": 2, "maxTotalBytes": 4096},
        defaults,
    ]


def test_room_for_another_picture_counts_pictures_and_their_bytes_together(run) -> None:
    limits = "{ maxBytes: 3000, maxPixels: 1e9, maxImages: 3, maxTotalBytes: 4096 }"
    data = bytes(2048)
    check = f"images.checkRoom(file, ATTACHED, {limits}); return 'fits';"
    assert run(data, check.replace("ATTACHED", "[1024, 1024]"), name="c.png") == {"value": "fits"}
    assert run(data, check.replace("ATTACHED", "[2048, 1024]"), name="c.png") == {
        "error": '"c.png" would bring this message\'s pictures to 5 KB; together they can be at '
        "most 4 KB. Send it in another message.",
        "name": "ImageError",
    }
    assert run(data, check.replace("ATTACHED", "[1, 1, 1]"), name="d.png") == {
        "error": 'A message can carry at most 3 pictures; "d.png" was not added.',
        "name": "ImageError",
    }
