"""Uploaded image bytes -> a validated RGB picture (Pillow only, no torch: the gateway imports it).

Every image a client sends goes through `decode_image` before anything else sees it. The
order of checks is what makes it safe on hostile input:

1. the byte count, before Pillow is touched;
2. the format and the pixel count, read from the header alone (`probe_image`): Pillow's
   `Image.open` parses only the header, so a 10000 x 10000 PNG that would take 300 MB once
   decoded is refused having read a few dozen bytes. Pillow's own guard
   (`Image.MAX_IMAGE_PIXELS`, `DecompressionBombError`) is a process-wide global and other
   code in the process may change it, so the limit here is our own and checked first;
3. only then the full decode, EXIF orientation, and conversion to RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

# Pillow format name -> the MIME type the wire format carries. MPO is the multi-picture
# JPEG some phone cameras write; Pillow opens it through the JPEG plugin and its first
# picture is an ordinary JPEG.
SUPPORTED_FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
SUPPORTED_MIME_TYPES: frozenset[str] = frozenset(SUPPORTED_FORMATS.values())
_FORMAT_LIST = "PNG, JPEG, WebP or GIF"
# Only these plugins are tried when opening: an upload never reaches the parsers of the
# dozens of other formats Pillow knows (smaller attack surface, clearer errors).
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class ImageInputError(ValueError):
    """An uploaded image was refused; the message says what to fix."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024  # the encoded file as uploaded
    max_pixels: int = 16_000_000  # width * height, checked from the header before decoding


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    format: str  # Pillow's name: PNG, JPEG, MPO, WEBP, GIF
    mime_type: str
    width: int
    height: int


def _check_bytes(data: bytes, limits: ImageLimits) -> None:
    if not data:
        raise ImageInputError("the image is empty (0 bytes); attach a PNG, JPEG, WebP or GIF file")
    if len(data) > limits.max_bytes:
        raise ImageInputError(
            f"the image is {len(data)} bytes; at most {limits.max_bytes} bytes "
            f"({limits.max_bytes / 2**20:.0f} MiB) are accepted: send a smaller or more "
            "compressed file"
        )


def _open(data: bytes) -> Image.Image:
    """Open lazily (header only). Pillow's own bomb warning/error is silenced or mapped:
    our limit is checked by the caller and is normally far below Pillow's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageInputError(
            f"the image has too many pixels to be decoded safely ({e}); send a smaller picture"
        ) from e
    except Exception as e:  # UnidentifiedImageError, or any parser error on hostile bytes
        raise ImageInputError(
            f"the data is not a readable image; send a {_FORMAT_LIST} file"
        ) from e


def _check_header(image: Image.Image, limits: ImageLimits) -> ImageInfo:
    fmt = (image.format or "").upper()
    if fmt not in SUPPORTED_FORMATS:
        raise ImageInputError(f"unsupported image format {fmt or 'unknown'}; send {_FORMAT_LIST}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageInputError(
            f"the image is {width}x{height} = {width * height} pixels; at most "
            f"{limits.max_pixels} pixels ({limits.max_pixels / 1e6:g} megapixels) are "
            "accepted: scale it down"
        )
    return ImageInfo(format=fmt, mime_type=SUPPORTED_FORMATS[fmt], width=width, height=height)


def probe_image(data: bytes, limits: ImageLimits = ImageLimits()) -> ImageInfo:
    """Check bytes, format and pixel count from the header alone; decode nothing."""
    _check_bytes(data, limits)
    with _open(data) as image:
        return _check_header(image, limits)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB without surprises: transparent pixels become white (what a browser shows behind a
    transparent PNG), not whatever colour the encoder left under alpha 0."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes of a PNG, JPEG, WebP or GIF (first frame) -> an RGB image, EXIF orientation applied.

    Raises ImageInputError (a ValueError) with a message saying what to fix. The pixel count
    is checked from the header before anything is decoded.
    """
    _check_bytes(data, limits)
    image = _open(data)
    try:
        _check_header(image, limits)
        # Image.open leaves an animated GIF/WebP on its first frame; loading decodes that frame
        # only (asking n_frames would walk every frame of a possibly huge animation).
        image.load()
        # exif_transpose returns a new image (or a copy) with the orientation tag applied; a
        # 90-degree turn swaps width and height but keeps the pixel count, so no recheck.
        upright = ImageOps.exif_transpose(image)
        return _to_rgb(upright if upright is not None else image)
    except ImageInputError:
        raise
    except Exception as e:
        # Truncated or corrupt data past a valid header. Pillow's plugins raise many kinds of
        # errors on hostile bytes (OSError, SyntaxError, struct.error, ...): all are the
        # client's data, never a server fault.
        raise ImageInputError(
            f"the image data is damaged or truncated ({e}); send the complete {_FORMAT_LIST} file"
        ) from e
    finally:
        image.close()
