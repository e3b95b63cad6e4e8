"""decode_image: uploaded bytes -> a validated RGB picture, refusing what it must refuse."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from model.image_input import (
    ImageInputError,
    ImageLimits,
    decode_image,
    probe_image,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def two_colour(size: tuple[int, int] = (40, 30)) -> Image.Image:
    """Left half red, right half blue: orientation changes are visible in the pixels."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a few dozen bytes that a
    careless decoder would expand to width*height*3 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "kwargs", "mime"),
    [
        ("PNG", {}, "image/png"),
        ("JPEG", {"quality": 95}, "image/jpeg"),
        ("WEBP", {"lossless": True}, "image/webp"),
        ("GIF", {}, "image/gif"),
    ],
)
def test_supported_formats_decode_to_rgb(fmt: str, kwargs: dict, mime: str) -> None:
    source = two_colour()
    data = encode(source, fmt, **kwargs)
    assert probe_image(data).mime_type == mime
    image = decode_image(data)
    assert image.mode == "RGB"
    assert image.size == (40, 30)
    red = image.getpixel((2, 15))
    blue = image.getpixel((37, 15))
    assert red[0] > 200 and red[2] < 60, red
    assert blue[2] > 200 and blue[0] < 60, blue


def test_gif_first_frame_only() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert decode_image(data).getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("orientation", "size", "left_colour_at"),
    [
        (1, (40, 30), (2, 15)),  # as stored
        (3, (40, 30), (37, 15)),  # turned 180: red ends on the right
        (6, (30, 40), (15, 2)),  # turned 90 clockwise: red ends on top
        (8, (30, 40), (15, 37)),  # turned 90 counter-clockwise: red ends at the bottom
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], left_colour_at: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(two_colour(), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data)
    assert image.size == size
    r, _, b = image.getpixel(left_colour_at)
    assert r > 200 and b < 60, (orientation, image.getpixel(left_colour_at))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    source = Image.new("RGB", (8, 8), (10, 200, 30))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(source.convert(mode), fmt)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_transparent_pixels_become_white() -> None:
    source = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    source.putpixel((0, 0), (0, 0, 0, 255))  # one opaque black pixel
    image = decode_image(encode(source, "PNG"))
    assert image.getpixel((4, 4)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (0, 0, 0)


def test_decompression_bomb_refused_from_header_without_decoding() -> None:
    """A 100-megapixel claim is refused from the IHDR: fast, and no 300 MB allocation."""
    data = png_header_only(10_000, 10_000)
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(ImageInputError, match=r"10000x10000 = 100000000 pixels.*16 megapixels"):
        decode_image(data)
    assert time.perf_counter() - start < 0.5


def test_pixel_limit_is_ours_not_pillows() -> None:
    """Pillow's global MAX_IMAGE_PIXELS may be anything; our limit holds regardless."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # another library in the process switched Pillow's guard off
    try:
        with pytest.raises(ImageInputError, match="pixels"):
            decode_image(
                encode(Image.new("RGB", (101, 100)), "PNG"), ImageLimits(max_pixels=10_000)
            )
        assert decode_image(
            encode(Image.new("RGB", (100, 100)), "PNG"), ImageLimits(max_pixels=10_000)
        ).size == (100, 100)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_byte_limit_checked_before_parsing() -> None:
    data = encode(two_colour(), "PNG")
    with pytest.raises(ImageInputError, match=rf"{len(data)} bytes; at most 100 bytes"):
        decode_image(data, ImageLimits(max_bytes=100))
    # Garbage over the limit is refused for its size, not parsed.
    with pytest.raises(ImageInputError, match="bytes; at most"):
        decode_image(b"x" * 101, ImageLimits(max_bytes=100))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is not an image",
        b"%PDF-1.4\n" + b"0" * 100,
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing else
    ],
)
def test_non_images_refused_with_a_clear_message(data: bytes) -> None:
    with pytest.raises(ImageInputError, match=r"PNG, JPEG, WebP or GIF"):
        decode_image(data)


def test_other_formats_refused() -> None:
    for fmt in ("BMP", "TIFF", "ICO"):
        with pytest.raises(ImageInputError, match=r"PNG, JPEG, WebP or GIF"):
            decode_image(encode(Image.new("RGB", (16, 16)), fmt))


def test_truncated_image_refused() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageInputError, match="damaged or truncated"):
        decode_image(data[: len(data) // 2])
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageInputError, match="damaged or truncated"):
        decode_image(jpeg[: len(jpeg) // 2])


def test_error_is_a_value_error() -> None:
    assert issubclass(ImageInputError, ValueError)
