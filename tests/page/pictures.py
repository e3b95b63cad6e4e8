"""Pictures for the page tests, written by Pillow: plain ones in each accepted format, and the
kinds the demo model answers about (how many shapes, which number), drawn here with their own
sizes, positions and colours rather than the demo corpus's generator."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def plain(size: tuple[int, int], colour: str, fmt: str = "PNG") -> bytes:
    """A filled rectangle on white: easy to tell apart by size and colour once shown."""
    image = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(image).rectangle((w // 6, h // 6, w - w // 6, h - h // 6), fill=colour)
    return encode(image, fmt)


def payload(name: str, data: bytes, mime: str) -> dict:
    """A file for Playwright's set_input_files / FileChooser.set_files."""
    return {"name": name, "mimeType": mime, "buffer": data}


def shapes(count: int, size: int = 448) -> bytes:
    """`count` (1-5) separate shapes of mixed kinds and colours on a light background, PNG."""
    image = Image.new("RGB", (size, size), (246, 244, 236))
    draw = ImageDraw.Draw(image)
    cell = size // 3
    spots = [(0, 0), (2, 0), (1, 1), (0, 2), (2, 2)]  # a dice five: never touching
    colours = ["#d62828", "#1d6fd6", "#2a9d3a", "#e08a00", "#7b2cbf"]
    for i in range(count):
        cx, cy = spots[i]
        x0, y0 = cx * cell + cell // 6, cy * cell + cell // 6
        x1, y1 = x0 + cell * 2 // 3, y0 + cell * 2 // 3
        kind = i % 3
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colours[i])
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colours[i])
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colours[i])
    return encode(image, "PNG")


def number(value: int, size: int = 448) -> bytes:
    """`value` (0-99) drawn large (digits about 40% of the height) and centred in Pillow's
    own font, dark on white, PNG."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size * 3 // 5)
    draw.text((size // 2, size // 2), str(value), fill=(20, 20, 40), font=font, anchor="mm")
    return encode(image, "PNG")
