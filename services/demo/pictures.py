"""Synthetic pictures for the VL2 demo: shapes to count, numbers to read, sums to solve.

Everything is drawn with Pillow from a seeded `random.Random`, so a seed fixes every picture.
Each property a picture is judged on is split between training and evaluation:

- fonts: training draws digits with a stroke font defined below (random weight, slant and
  proportions), Pillow's bitmap font scaled up and the DejaVu family (every variant the
  Debian/Ubuntu packages install; all must be there, so training data is the same on every
  machine); evaluation draws with families training never sees: Pillow's own Aileron,
  Liberation and WenQuanYi Micro Hei (those of them the machine has);
- colours: hues are cut into 30-degree bins, even bins for training, odd bins held out (for the
  shapes, the digits and the backgrounds);
- layouts: training scatters the shapes (often packed close, often of one size) or drops them
  into a jittered grid of 2-4 by 2-3 cells, held-out pictures line them up in a row or a ring;
- sizes: training draws numbers 35-50% or 60-85% of the picture's height, held-out 50-60%.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

Split = Literal["train", "held_out"]
Shape = Literal["circle", "square", "triangle"]
SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle")
MAX_SHAPES = 5
MAX_NUMBER = 99

# Classes of an `Ink` map's pixels: 0-9 a digit's ink, then these.
INK_BACKGROUND = 10
INK_SHAPE = 11
INK_OTHER = 12  # an operator's ink (+ - ×)


@dataclass
class Ink:
    """Where a picture shows what it is asked about, for the reading pre-stage's per-patch
    targets: `labels` is an "L" image the picture's size, each pixel the class of the ink that
    covers it (0-9, INK_*); `centres` are the shapes' centres in pixels."""

    labels: Image.Image
    centres: list[tuple[float, float]]


# Fonts, by file name (Pillow looks them up in the system's font folders). Training draws with
# the DejaVu family, Debian/Ubuntu's default (the packages fonts-dejavu-core and
# fonts-dejavu-extra), beside the stroke font below and Pillow's bitmap font; evaluation draws
# with families training never sees: Pillow's own Aileron, Liberation (Arial-, Times- and
# Courier-like) and WenQuanYi Micro Hei.
TRAIN_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-ExtraLight.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
TRAIN_FONT_PACKAGES = "fonts-dejavu-core fonts-dejavu-extra"
TRAIN_FONTS: tuple[str, ...] = ("stroke", "pillow-bitmap", *TRAIN_FONT_FILES)
HELD_OUT_FONT_FILES: tuple[str, ...] = (
    "LiberationSans-Regular.ttf",
    "LiberationSerif-Regular.ttf",
    "LiberationMono-Regular.ttf",
    "LiberationSans-Bold.ttf",
    "LiberationSerif-Bold.ttf",
    "LiberationSansNarrow-Regular.ttf",
    "wqy-microhei.ttc",
)
HELD_OUT_FONT_PACKAGES = "fonts-liberation fonts-wqy-microhei"


class MissingFontError(RuntimeError):
    """A font the pictures are drawn with is not installed."""


def _installed(name: str) -> bool:
    try:
        ImageFont.truetype(name, 12)
    except OSError:
        return False
    return True


@cache
def train_fonts() -> tuple[str, ...]:
    """Every training font: all must be installed, so training data is the same everywhere."""
    missing = [name for name in TRAIN_FONT_FILES if not _installed(name)]
    if missing:
        raise MissingFontError(
            f"training pictures need the fonts {', '.join(missing)}: install "
            f"{TRAIN_FONT_PACKAGES} (Debian/Ubuntu)"
        )
    return TRAIN_FONTS


@cache
def held_out_fonts() -> tuple[str, ...]:
    """Pillow's Aileron and the held-out font files this machine has."""
    return ("pillow-aileron", *(name for name in HELD_OUT_FONT_FILES if _installed(name)))


# ---- colours ---------------------------------------------------------------------------------


def _hue(rng: random.Random, split: Split) -> float:
    """A hue in [0, 1) from the split's 30-degree bins (even bins train, odd bins held out)."""
    bin_ = 2 * rng.randrange(6) + (split == "held_out")
    return (bin_ * 30 + rng.uniform(2, 28)) / 360


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _luma(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def colours(rng: random.Random, split: Split, count: int) -> tuple[tuple, list[tuple]]:
    """A background and `count` foreground colours that stand out from it: a light background
    with deep colours on it, or a dark one with bright colours."""
    light = rng.random() < 0.7
    if light:
        background = _rgb(_hue(rng, split), rng.uniform(0.0, 0.3), rng.uniform(0.85, 1.0))
    else:
        background = _rgb(_hue(rng, split), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.25))
    out = []
    while len(out) < count:
        if light:
            colour = _rgb(_hue(rng, split), rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.75))
        else:
            colour = _rgb(_hue(rng, split), rng.uniform(0.2, 0.8), rng.uniform(0.75, 1.0))
        if abs(_luma(colour) - _luma(background)) >= 70:
            out.append(colour)
    return background, out


# ---- shapes ----------------------------------------------------------------------------------


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    """Pictures come in various sizes and proportions; the processor fits them to its tiles."""
    w = rng.randint(80, 192)
    h = max(64, min(224, round(w * rng.uniform(0.75, 1.33))))
    return w, h


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float, r: float, angle: float, fill
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    corners = 4 if shape == "square" else 3
    # A square's corners sit at r * sqrt(2) / sqrt(2) = r from its edges' middles: use the
    # circumradius that makes its area comparable to the circle's.
    radius = r * (1.25 if shape == "square" else 1.35)
    points = [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / corners),
            cy + radius * math.sin(angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]
    draw.polygon(points, fill=fill)


def _scatter(
    rng: random.Random, w: int, h: int, radii: list[float]
) -> tuple[list[tuple[float, float]], list[float]] | None:
    """Random centres (and the radii) packed close, and for half the pictures shapes of about
    one size, drawn as a set; None when they do not fit. Neighbours keep only 15% of their
    sizes apart, so a square's or a triangle's corners may touch the next shape (about 3% of
    pictures of two to five shapes): counting shapes that nearly touch is what a held-out row
    of five asks. With well-spread shapes of independent sizes (1.45 of their sizes apart) the
    reading stage's classifier counted 78% of held-out rows, with these 91%
    (services/demo/README.md)."""
    if rng.random() < 0.5:
        radii = [radii[0] * rng.uniform(0.85, 1.15) for _ in radii]
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(200):
            x, y = rng.uniform(r * 1.4, w - r * 1.4), rng.uniform(r * 1.4, h - r * 1.4)
            if all(
                math.dist((x, y), c) > (r + q) * 1.15 for c, q in zip(centres, radii, strict=False)
            ):
                centres.append((x, y))
                break
        else:
            return None
    return centres, radii


def _grid(rng: random.Random, count: int, w: int, h: int) -> list[tuple[float, float]]:
    """Cells of a 2-4 by 2-3 grid, each centre jittered by up to 15% of its cell. The grid is
    never one line (rows are held out); a few pictures of three shapes (a fraction of a percent
    of four) do land in one of its rows, as three did in the 3 x 2 grid this replaced."""
    cols, rows = rng.choice([(c, r) for c in (2, 3, 4) for r in (2, 3) if c * r >= count])
    if h > w:
        cols, rows = rows, cols
    cells = rng.sample(range(cols * rows), count)
    jx, jy = 0.15 * w / cols, 0.15 * h / rows
    return [
        (
            (c % cols + 0.5) * w / cols + rng.uniform(-jx, jx),
            (c // cols + 0.5) * h / rows + rng.uniform(-jy, jy),
        )
        for c in cells
    ]


def _row(rng: random.Random, count: int, w: int, h: int) -> list[tuple[float, float]]:
    y = h * rng.uniform(0.35, 0.65)
    return [((k + 0.5) * w / count, y) for k in range(count)]


def _ring(rng: random.Random, count: int, w: int, h: int) -> list[tuple[float, float]]:
    if count == 1:
        return [(w / 2, h / 2)]
    start = rng.uniform(0, 2 * math.pi)
    rx, ry = w * 0.32, h * 0.32
    return [
        (
            w / 2 + rx * math.cos(start + 2 * math.pi * k / count),
            h / 2 + ry * math.sin(start + 2 * math.pi * k / count),
        )
        for k in range(count)
    ]


def shapes_picture(
    rng: random.Random, count: int, split: Split, *, easy: bool = False
) -> Image.Image:
    """`count` circles, squares and triangles of mixed colours and sizes (`easy`: dark shapes
    on white, the curriculum's start)."""
    return shapes_picture_with_ink(rng, count, split, easy=easy)[0]


def shapes_picture_with_ink(
    rng: random.Random, count: int, split: Split, *, easy: bool = False
) -> tuple[Image.Image, Ink]:
    """`shapes_picture` and where its shapes are."""
    if not 1 <= count <= MAX_SHAPES:
        raise ValueError(f"count must be 1-{MAX_SHAPES}, not {count}")
    while True:
        w, h = _canvas_size(rng)
        layout = rng.choice(("scatter", "grid") if split == "train" else ("row", "ring"))
        side = min(w, h)
        if layout == "scatter":
            # down to shapes a few pixels wide once fitted to a 64 px tile (five in a row
            # are that small)
            radii = [side * rng.uniform(0.04, 0.15) for _ in range(count)]
            placed = _scatter(rng, w, h, radii)
            if placed is None:
                continue
            centres, radii = placed
        else:
            place = {"grid": _grid, "row": _row, "ring": _ring}[layout]
            centres = place(rng, count, w, h)
            # room per shape: half the spacing between neighbours, and the edges
            gap = min([math.dist(p, q) for p in centres for q in centres if p != q] or [side * 0.8])
            most = min(gap * 0.34, side * 0.15)
            radii = [rng.uniform(min(side * 0.06, most * 0.7), most) for _ in range(count)]
        break
    background, fills = colours(rng, split, count)
    if easy:
        background, ink = _easy_colours(rng)
        fills = [ink] * count
    image = Image.new("RGB", (w, h), background)
    labels = Image.new("L", (w, h), INK_BACKGROUND)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for (cx, cy), r, fill in zip(centres, radii, fills, strict=True):
        angle, shape = rng.uniform(0, 2 * math.pi), rng.choice(SHAPES)
        _draw_shape(draw, shape, cx, cy, r, angle, fill)
        _draw_shape(draw_labels, shape, cx, cy, r, angle, INK_SHAPE)
    return image, Ink(labels, list(centres))


# ---- the stroke font ------------------------------------------------------------------------
# Glyphs in a unit box (x right, y down), as strokes: lists of points. Arcs are sampled
# ellipses; angles in degrees with y down (0 right, 90 bottom, 180 left, 270 top).


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 24):
    return [
        (
            cx + rx * math.cos(math.radians(start + (end - start) * k / n)),
            cy + ry * math.sin(math.radians(start + (end - start) * k / n)),
        )
        for k in range(n + 1)
    ]


def _glyph(char: str, rng: random.Random) -> list[list[tuple[float, float]]]:
    """The strokes of one character, with a random variant where a digit has two common forms."""
    variant = rng.random() < 0.5
    match char:
        case "0":
            return [_arc(0.5, 0.5, 0.42, 0.5, 0, 360, 36)]
        case "1":
            strokes = [[(0.25, 0.22), (0.55, 0.0), (0.55, 1.0)]]
            return strokes + ([[(0.25, 1.0), (0.85, 1.0)]] if variant else [])
        case "2":
            return [[*_arc(0.5, 0.3, 0.42, 0.3, 200, 380), (0.06, 1.0), (0.95, 1.0)]]
        case "3":
            return [_arc(0.5, 0.26, 0.38, 0.26, 200, 450) + _arc(0.5, 0.74, 0.42, 0.26, 270, 520)]
        case "4":
            if variant:
                return [[(0.72, 1.0), (0.72, 0.0), (0.04, 0.7), (0.96, 0.7)]]
            return [[(0.45, 0.0), (0.06, 0.66), (0.96, 0.66)], [(0.72, 0.3), (0.72, 1.0)]]
        case "5":
            return [[(0.85, 0.0), (0.22, 0.0), (0.17, 0.46), *_arc(0.5, 0.68, 0.4, 0.32, 215, 520)]]
        case "6":
            return [_arc(0.58, 0.6, 0.45, 0.6, 300, 150), _arc(0.5, 0.7, 0.37, 0.3, 0, 360, 30)]
        case "7":
            strokes = [[(0.05, 0.0), (0.95, 0.0), (0.35, 1.0)]]
            return strokes + ([[(0.35, 0.5), (0.8, 0.5)]] if variant else [])
        case "8":
            return [
                _arc(0.5, 0.25, 0.33, 0.25, 0, 360, 30),
                _arc(0.5, 0.72, 0.42, 0.28, 0, 360, 30),
            ]
        case "9":
            stem = (
                [(0.88, 0.3), (0.88, 1.0)] if variant else [(0.88, 0.3), (0.8, 0.72), (0.35, 1.0)]
            )
            return [_arc(0.5, 0.3, 0.38, 0.3, 0, 360, 30), stem]
        case "+":
            return [[(0.5, 0.2), (0.5, 0.8)], [(0.15, 0.5), (0.85, 0.5)]]
        case "-":
            return [[(0.15, 0.5), (0.85, 0.5)]]
        case "×":
            return [[(0.2, 0.25), (0.8, 0.75)], [(0.8, 0.25), (0.2, 0.75)]]
    raise ValueError(f"the stroke font has no {char!r}")


def _stroke_text(rng: random.Random, text: str, height: int, colour) -> Image.Image:
    """`text` in the stroke font on a transparent canvas: random weight, slant and width."""
    weight = height * rng.uniform(0.07, 0.16)
    slant = rng.uniform(-0.05, 0.25)
    glyph_w = height * rng.uniform(0.45, 0.65)
    advance = glyph_w * rng.uniform(1.25, 1.45)
    pad = weight + abs(slant) * height
    width = round(advance * len(text) + 2 * pad)
    canvas = Image.new("RGBA", (width, round(height + 2 * weight)), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, char in enumerate(text):
        if char == " ":
            continue
        x0 = pad + i * advance
        for stroke in _glyph(char, rng):
            points = [
                (x0 + x * glyph_w + slant * (1 - y) * height, weight + y * height)
                for x, y in stroke
            ]
            draw.line(points, fill=colour, width=max(1, round(weight)), joint="curve")
            r = weight / 2  # round caps
            for px, py in (points[0], points[-1]):
                draw.ellipse((px - r, py - r, px + r, py + r), fill=colour)
    return canvas.crop(canvas.getbbox() or (0, 0, 1, 1))


@cache
def _sized_font(font_name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font file opened once per size (opening it costs more than drawing a number)."""
    if font_name == "pillow-aileron":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(font_name, size)


def _font_text(font_name: str, text: str, height: int, colour, rng: random.Random) -> Image.Image:
    """`text` in a Pillow font at about `height` pixels of digit height."""
    if font_name == "pillow-bitmap":
        # Pillow's built-in bitmap font is 11 px high: draw it small, scale it up blocky (a
        # smooth upscale of its 1 px strokes turns some digits into blobs).
        font = ImageFont.load_default_imagefont()
        small = Image.new("RGBA", (8 * len(text) + 8, 16), (0, 0, 0, 0))
        ImageDraw.Draw(small).text((2, 1), text, font=font, fill=colour)
        small = small.crop(small.getbbox() or (0, 0, 1, 1))
        scale = height / max(1, small.height)
        size = (max(1, round(small.width * scale * rng.uniform(0.8, 1.2))), height)
        return small.resize(size, Image.Resampling.NEAREST)
    size = round(height * 1.4)  # a font's digits are ~0.72 of its size
    font = _sized_font(font_name, size)
    bold = rng.choice((0, 0, max(1, size // 25)))
    box = ImageDraw.Draw(Image.new("RGBA", (1, 1))).textbbox(
        (0, 0), text, font=font, stroke_width=bold
    )
    canvas = Image.new("RGBA", (box[2] + 4, box[3] + 4), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (2, 2), text, font=font, fill=colour, stroke_width=bold, stroke_fill=colour
    )
    return canvas.crop(canvas.getbbox() or (0, 0, 1, 1))


def _fonts(split: Split) -> Sequence[str]:
    return train_fonts() if split == "train" else held_out_fonts()


def _easy_colours(rng: random.Random) -> tuple[tuple, tuple]:
    """Near-white background, near-black ink: the start of the reading curriculum."""
    grey = rng.randint(225, 255)
    ink = rng.randint(0, 40)
    return (grey, grey, grey), (ink, ink, ink)


def text_picture(
    rng: random.Random, text: str, split: Split, *, font: str | None = None, easy: bool = False
) -> Image.Image:
    """`text` (digits, spaces, + - ×) drawn large on a plain background in a random font of
    the split, size band, colour and position. `easy` (training's curriculum start): dark ink
    on white, large and near the centre."""
    return text_picture_with_ink(rng, text, split, font=font, easy=easy)[0]


def text_picture_with_ink(
    rng: random.Random, text: str, split: Split, *, font: str | None = None, easy: bool = False
) -> tuple[Image.Image, Ink]:
    """`text_picture` and where its characters are: the drawn box is cut into equal slices, one
    per character (digits are of equal width in the fonts drawn here), and each slice's ink
    gets its digit's class (other characters: INK_OTHER)."""
    w, h = _canvas_size(rng)
    if easy:
        background, colour = _easy_colours(rng)
        band = (0.6, 0.85)
    else:
        background, (colour,) = colours(rng, split, 1)
        band = rng.choice(((0.35, 0.5), (0.6, 0.85))) if split == "train" else (0.5, 0.6)
    font = font or rng.choice(_fonts(split))
    for _ in range(20):
        height = round(h * rng.uniform(*band))
        if font == "stroke" or any(c in text for c in "+-×"):
            glyphs = (
                _stroke_text(rng, text, height, colour)
                if font == "stroke"
                else _mixed_text(rng, font, text, height, colour)
            )
        else:
            glyphs = _font_text(font, text, height, colour, rng)
        if glyphs.width <= w * 0.95:
            break
        band = (band[0] * 0.85, band[1] * 0.85)  # too wide for this canvas: smaller
    else:
        glyphs = glyphs.resize(
            (round(w * 0.9), max(1, round(glyphs.height * w * 0.9 / glyphs.width)))
        )
    image = Image.new("RGB", (w, h), background)
    x = rng.randint(0, max(0, w - glyphs.width))
    y = rng.randint(0, max(0, h - glyphs.height))
    if easy:  # centred, give or take a tenth of the picture
        x = max(0, (w - glyphs.width) // 2 + rng.randint(-w // 10, w // 10))
        y = max(0, (h - glyphs.height) // 2 + rng.randint(-h // 10, h // 10))
    image.paste(glyphs, (x, y), glyphs)
    labels = Image.new("L", (w, h), INK_BACKGROUND)
    ink = glyphs.getchannel("A").point(lambda a: 255 if a >= 128 else 0)
    slice_w = glyphs.width / len(text)
    for i, char in enumerate(text):
        if char == " ":
            continue
        left, right = round(i * slice_w), round((i + 1) * slice_w)
        value = int(char) if char.isdigit() else INK_OTHER
        piece = Image.new("L", (right - left, glyphs.height), value)
        labels.paste(piece, (x + left, y), ink.crop((left, 0, right, glyphs.height)))
    return image, Ink(labels, [])


def _mixed_text(rng: random.Random, font: str, text: str, height: int, colour) -> Image.Image:
    """Digits in `font`, operators in the stroke font, side by side (not every font has ×)."""
    parts = []
    for token in text.split(" "):
        if token.isdigit():
            parts.append(_font_text(font, token, height, colour, rng))
        else:
            parts.append(_stroke_text(rng, token, round(height * 0.6), colour))
    gap = round(height * 0.25)
    width = sum(p.width for p in parts) + gap * (len(parts) - 1)
    canvas = Image.new("RGBA", (width, max(p.height for p in parts)), (0, 0, 0, 0))
    x = 0
    for p in parts:
        canvas.paste(p, (x, (canvas.height - p.height) // 2), p)
        x += p.width + gap
    return canvas


def number_picture(
    rng: random.Random, n: int, split: Split, *, font: str | None = None, easy: bool = False
) -> Image.Image:
    return number_picture_with_ink(rng, n, split, font=font, easy=easy)[0]


def number_picture_with_ink(
    rng: random.Random, n: int, split: Split, *, font: str | None = None, easy: bool = False
) -> tuple[Image.Image, Ink]:
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"n must be 0-{MAX_NUMBER}, not {n}")
    return text_picture_with_ink(rng, str(n), split, font=font, easy=easy)


@dataclass(frozen=True)
class PictureFacts:
    """What a picture shows, for building questions and checking answers."""

    kind: Literal["count", "number", "problem"]
    answer: int
    text: str  # the number or problem as drawn ("42", "12 + 7"); the count for shapes
