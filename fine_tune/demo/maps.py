"""A synthetic, offline demo map collection: a folder of map images plus ``metadata.csv``.

Why: a tiny CLIP model needs (image, caption) pairs to learn, and tests and demos must run
without the network.  Each image is drawn as one of a handful of map *kinds* (relief map,
nautical chart, ...) whose palette, structure and texture differ strongly enough to be told
apart at 64x64 px, while the content inside a kind (coastlines, regions, street grids, colours,
place names) is random, so a model has to learn the kind rather than memorise pictures.
The ``kind`` column is the ground truth for evaluating search.  Some maps can be drawn as
lettered sheets of 1,024 px (``lettering.py``): the same picture, scaled, with place names an OCR
model can read and a ``words.csv`` saying what is printed where.

Only numpy and Pillow are used; noise is vectorised (random grids upsampled bicubically), so
360 images at 256 px take well under a minute on a small CPU.
"""

from __future__ import annotations

import contextvars
import csv
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..kinds import KINDS
from .lettering import LETTERED_SIZE, NAMES_PER_SHEET, PRINTED_NAMES, Label, letter_sheet, truth_rows, write_truth

COLUMNS = (
    "file", "item_id", "sheet", "title", "date", "year", "place", "subjects", "contributors",
    "notes", "format", "kind",
)
JPEG_QUALITY = 88
MULTI_SHEET_SHARE = 0.10  # share of items that are multi-sheet atlases (2-4 sheets)

Array = np.ndarray


# --------------------------------------------------------------------------------------------
# Shared drawing helpers
# --------------------------------------------------------------------------------------------

# While a lettered sheet is drawn (``draw_map(..., text=False)``) the drawers print no text of their
# own: every word on such a sheet is one the lettering placed and recorded as truth.
_PRINTING: contextvars.ContextVar[bool] = contextvars.ContextVar("demo_printing", default=True)
# ... and the drawers of kinds with a coast hand over their water mask, for names set along it.
_WATER: contextvars.ContextVar[list | None] = contextvars.ContextVar("demo_water", default=None)


def _text(draw: ImageDraw.ImageDraw, xy, text: str, **options) -> None:
    if _PRINTING.get():
        draw.text(xy, text, **options)


def _note_water(water: Array) -> None:
    found = _WATER.get()
    if found is not None:
        found.append(water)


def _font(size: int, points: float = 9) -> ImageFont.ImageFont:
    """Pillow's bundled font, scaled with the image so labels keep their relative size."""
    return ImageFont.load_default(size=max(5, round(points * size / 256)))


def _noise(rng: np.random.Generator, size: int, cells: int = 3, octaves: int = 4,
           persistence: float = 0.5) -> Array:
    """Smooth fractal value noise in [0, 1]: random grids upsampled bicubically and summed.

    Upsampling with Pillow is vectorised C, far faster than per-pixel Perlin noise."""
    total = np.zeros((size, size), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        n = min(cells * 2 ** octave, size // 2)
        grid = rng.random((n + 1, n + 1), dtype=np.float32)
        total += amplitude * np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
        norm += amplitude
        amplitude *= persistence
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _coords(size: int) -> tuple[Array, Array]:
    """Pixel centre coordinates scaled to [0, 1): (x, y)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(axis, axis)


def _regions(rng: np.random.Generator, size: int, count: int, warp: float = 0.06) -> tuple[Array, Array]:
    """Irregular regions: a Voronoi diagram of random seeds in noise-warped coordinates.

    Returns (label per pixel, seed points in [0, 1]^2).  Warping gives wiggly, natural borders."""
    x, y = _coords(size)
    x = x + (_noise(rng, size, 3, 3) - 0.5) * 2 * warp
    y = y + (_noise(rng, size, 3, 3) - 0.5) * 2 * warp
    seeds = rng.random((count, 2), dtype=np.float32)
    distance = (x[..., None] - seeds[:, 0]) ** 2 + (y[..., None] - seeds[:, 1]) ** 2
    return distance.argmin(-1), seeds


def _edges(labels: Array) -> Array:
    """Boolean mask of pixels where the label changes to the right or below."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def _thicken(mask: Array, width: int) -> Array:
    """Dilate a boolean mask to roughly ``width`` pixels (MaxFilter needs an odd size)."""
    if width <= 1:
        return mask
    size = width if width % 2 else width + 1
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))
    return np.asarray(image) > 127


def _paint(canvas: Array, mask: Array, colour, alpha: float = 1.0) -> None:
    """Blend ``colour`` into ``canvas`` (float RGB) where ``mask`` is set (bool or 0..1 weights)."""
    weight = (mask.astype(np.float32) * alpha)[..., None]
    canvas *= 1 - weight
    canvas += weight * np.asarray(colour, np.float32)


def _jitter(rng: np.random.Generator, colour, amount: float = 12) -> tuple[int, int, int]:
    """A colour nudged randomly, so no two maps of a kind share an exact palette."""
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def _image(canvas: Array) -> Image.Image:
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _neatline(draw: ImageDraw.ImageDraw, size: int, colour=(40, 40, 40), inset: int | None = None) -> None:
    """The printed frame around most maps."""
    inset = max(2, size // 64) if inset is None else inset
    draw.rectangle([inset, inset, size - 1 - inset, size - 1 - inset], outline=colour, width=max(1, size // 128))


def _labels(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, names: list[str], count: int,
            colour, points: float = 8) -> None:
    """A few place names at random spots; unreadable at 64 px, but maps have lettering."""
    font = _font(size, points)
    for _ in range(count):
        x, y = rng.integers(size // 10, size * 7 // 10, 2)
        _text(draw, (int(x), int(y)), str(rng.choice(names)), fill=colour, font=font)


# --------------------------------------------------------------------------------------------
# One function per kind: (rng, size) -> RGB image
# --------------------------------------------------------------------------------------------

HYPSOMETRIC = [  # low -> high: greens, yellows, browns, snow
    (96, 150, 92), (132, 178, 104), (178, 204, 128), (222, 220, 148), (232, 204, 140),
    (212, 170, 112), (184, 136, 92), (150, 104, 74), (236, 232, 226),
]


def draw_relief(rng: np.random.Generator, size: int) -> Image.Image:
    """Relief map: hypsometric tint bands from smooth elevation, hillshade and contour lines."""
    elevation = _noise(rng, size, int(rng.integers(2, 4)), 5, 0.5)
    elevation = elevation ** rng.uniform(1.2, 1.8)  # lowlands are commoner than peaks
    levels = int(rng.integers(7, 10))
    band = np.minimum((elevation * levels).astype(int), levels - 1)
    tints = HYPSOMETRIC if rng.random() < 0.3 else HYPSOMETRIC[:-1]  # snow caps only sometimes
    palette = np.array([_jitter(rng, c, 8) for c in tints], np.float32)
    idx = np.round(band * (len(tints) - 1) / (levels - 1)).astype(int)
    canvas = palette[idx]
    # Hillshade: light from the north-west on the unquantised surface.
    gy, gx = np.gradient(elevation * size * rng.uniform(0.25, 0.5))
    shade = (-gx - gy) / np.sqrt(2) / np.sqrt(1 + gx ** 2 + gy ** 2)
    canvas *= (1 + 0.35 * shade)[..., None]
    if rng.random() < 0.5:  # lakes and rivers in the lowest band
        _paint(canvas, elevation < rng.uniform(0.04, 0.12), (150, 190, 220))
    fine = np.minimum((elevation * levels * 3).astype(int), levels * 3)
    _paint(canvas, _edges(fine), (120, 80, 50), 0.35)
    _paint(canvas, _edges(band), (100, 62, 36), 0.85)
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    _labels(draw, rng, size, ["Mt. " + n for n in PEAKS], int(rng.integers(1, 4)), (60, 40, 30))
    _neatline(draw, size, (50, 40, 30))
    return image


PASTELS = [
    (244, 190, 190), (250, 228, 150), (188, 224, 170), (212, 192, 232), (250, 206, 164),
    (236, 200, 222), (214, 230, 160), (252, 214, 200),
]


def draw_political(rng: np.random.Generator, size: int) -> Image.Image:
    """Political map: flat pastel regions, thick dark borders, capitals, a pale blue sea."""
    labels, seeds = _regions(rng, size, int(rng.integers(7, 18)), warp=rng.uniform(0.05, 0.1))
    palette = np.array([_jitter(rng, PASTELS[i % len(PASTELS)], 8) for i in rng.permutation(64)], np.float32)
    canvas = palette[labels % len(palette)]
    land = _land_mask(rng, size, rng.uniform(0.2, 0.4))
    _note_water(~land)
    _paint(canvas, ~land, _jitter(rng, (150, 196, 228), 6))  # a bluer sea than a chart's
    border = _thicken(_edges(labels) & land, max(2, size // 110))
    _paint(canvas, border, (70, 50, 55))
    _paint(canvas, _thicken(_edges(land.astype(int)), 2), (40, 60, 90))
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    font = _font(size, 8)
    radius = max(2, size // 85)
    for sx, sy in seeds:
        x, y = int(sx * size), int(sy * size)
        if 0 <= x < size and 0 <= y < size and land[y, x]:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(200, 30, 30), outline=(0, 0, 0))
            _text(draw, (x + radius + 1, y - radius), str(rng.choice(CAPITALS)), fill=(20, 20, 20), font=font)
    _neatline(draw, size)
    return image


def _land_mask(rng: np.random.Generator, size: int, sea_share: float) -> Array:
    """Land as a noise field tilted towards one random side, thresholded so roughly
    ``sea_share`` of the map is water."""
    x, y = _coords(size)
    angle = rng.uniform(0, 2 * math.pi)
    field = _noise(rng, size, 3, 5) + 0.8 * (x * math.cos(angle) + y * math.sin(angle))
    return field > np.quantile(field, sea_share)


def draw_street_plan(rng: np.random.Generator, size: int) -> Image.Image:
    """City street plan: cream paper, dense rotated street grids, pink/grey blocks, a river."""
    x, y = _coords(size)
    x = x * size + (_noise(rng, size, 2, 2) - 0.5) * size * 0.08
    y = y * size + (_noise(rng, size, 2, 2) - 0.5) * size * 0.08
    # Two districts with differently oriented grids, split along a random line.
    split = (x - size * rng.uniform(0.3, 0.7)) * math.cos(rng.uniform(0, math.pi)) + \
        (y - size * rng.uniform(0.3, 0.7)) * math.sin(rng.uniform(0, math.pi)) > 0
    street = np.zeros((size, size), bool)
    block = np.zeros((size, size), np.int64)
    for district in (split, ~split):
        angle = rng.uniform(0, math.pi / 2)
        u = x * math.cos(angle) + y * math.sin(angle)
        v = -x * math.sin(angle) + y * math.cos(angle)
        pu, pv = rng.uniform(0.04, 0.08, 2) * size
        width = max(1.2, size / 180) * rng.uniform(1, 1.6)
        on_street = ((u % pu) < width) | ((v % pv) < width)
        avenue = (np.abs(((u + pu * 3) % (pu * 6)) - pu * 3) < width * 1.5)
        street |= district & (on_street | avenue)
        block = np.where(district, (np.floor(u / pu) * 1000 + np.floor(v / pv)).astype(np.int64) * 2 +
                         split.astype(np.int64), block)
    paper = _jitter(rng, (242, 236, 220), 5)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = paper
    hashed = (block * 2654435761 + int(rng.integers(1 << 30))) % 100
    pink, grey = _jitter(rng, (228, 168, 160), 10), _jitter(rng, (196, 188, 184), 8)
    _paint(canvas, ~street & (hashed < 62), pink)
    _paint(canvas, ~street & (hashed >= 62) & (hashed < 92), grey)
    _paint(canvas, ~street & (hashed >= 92), (170, 200, 150))  # parks and squares
    _paint(canvas, _edges(street.astype(int)), (70, 60, 60), 0.8)
    if rng.random() < 0.75:  # a river crossing the town
        angle = rng.uniform(0, math.pi)
        offset = (x * math.cos(angle) + y * math.sin(angle)) / size - rng.uniform(0.3, 0.9)
        offset += (_noise(rng, size, 2, 2) - 0.5) * 0.3
        river = np.abs(offset) < rng.uniform(0.03, 0.07)
        _paint(canvas, river, (160, 198, 220))
        _paint(canvas, _edges(river.astype(int)), (60, 90, 120))
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    _labels(draw, rng, size, STREETS, int(rng.integers(2, 5)), (40, 30, 30), 7)
    _neatline(draw, size)
    return image


def draw_nautical(rng: np.random.Generator, size: int) -> Image.Image:
    """Nautical chart: pale blue sea with depth soundings, buff land, compass rose, rhumb lines."""
    x, y = _coords(size)
    angle = rng.uniform(0, 2 * math.pi)
    field = _noise(rng, size, 3, 5) + 1.2 * (x * math.cos(angle) + y * math.sin(angle))
    coast = np.quantile(field, rng.uniform(0.55, 0.75))
    land = field > coast
    _note_water(~land)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = _jitter(rng, (232, 242, 242), 4)
    _paint(canvas, (field > coast - 0.12) & ~land, _jitter(rng, (188, 216, 230), 6))  # shoal water
    _paint(canvas, (field > coast - 0.05) & ~land, _jitter(rng, (160, 198, 220), 6))
    _paint(canvas, land, _jitter(rng, (236, 214, 150), 10))
    _paint(canvas, _thicken(_edges(land.astype(int)), 2), (60, 50, 40))
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    sea_pixels = np.argwhere(~land)
    cx, cy = sea_pixels[rng.integers(len(sea_pixels))][::-1] if len(sea_pixels) else (size // 2, size // 2)
    line = (110, 120, 130)
    for k in range(32):  # rhumb lines radiate from the rose across the whole chart
        a = k * math.pi / 16
        draw.line([(cx, cy), (cx + 2 * size * math.cos(a), cy + 2 * size * math.sin(a))], fill=line, width=1)
    font = _font(size, 6)
    for py, px in sea_pixels[rng.integers(len(sea_pixels), size=int(rng.integers(60, 110)))]:
        depth = int(rng.integers(1, 12) + 30 * (coast - field[py, px]))
        _text(draw, (int(px), int(py)), str(depth), fill=(50, 60, 80), font=font)
    _compass_rose(draw, int(cx), int(cy), int(size * rng.uniform(0.09, 0.14)))
    _labels(draw, rng, size, HEADLANDS, int(rng.integers(1, 3)), (40, 30, 20))
    _neatline(draw, size)
    return image


def _compass_rose(draw: ImageDraw.ImageDraw, cx: int, cy: int, radius: int) -> None:
    """Concentric rings and a 16-point star: the mark of a chart."""
    for r in (radius, int(radius * 0.85)):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(40, 40, 60), width=1)
    for k in range(16):
        a = k * math.pi / 8
        length = radius * (1.0 if k % 4 == 0 else 0.75 if k % 2 == 0 else 0.5)
        side = radius * 0.12
        tip = (cx + length * math.cos(a), cy + length * math.sin(a))
        left = (cx + side * math.cos(a + math.pi / 2), cy + side * math.sin(a + math.pi / 2))
        right = (cx + side * math.cos(a - math.pi / 2), cy + side * math.sin(a - math.pi / 2))
        draw.polygon([left, tip, right], fill=(150, 40, 40) if k % 4 == 0 else (40, 40, 60))


RAMPS = [  # sequential colour ramps, light -> dark
    [(255, 255, 204), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38)],
    [(254, 240, 217), (253, 204, 138), (252, 141, 89), (215, 48, 31), (127, 0, 0)],
    [(241, 238, 246), (215, 181, 216), (223, 101, 176), (206, 18, 86), (103, 0, 31)],
    [(237, 248, 251), (179, 205, 227), (140, 150, 198), (136, 86, 167), (129, 15, 124)],
]


def draw_choropleth(rng: np.random.Generator, size: int) -> Image.Image:
    """Thematic map: many small county-like regions filled from a sequential ramp, a legend."""
    labels, seeds = _regions(rng, size, int(rng.integers(45, 90)), warp=rng.uniform(0.01, 0.03))
    ramp = np.array(RAMPS[int(rng.integers(len(RAMPS)))], np.float32)
    trend = _noise(rng, 16, 1, 2)  # spatially correlated values, as real data are
    value = trend[(seeds[:, 1] * 15).astype(int), (seeds[:, 0] * 15).astype(int)] + rng.normal(0, 0.2, len(seeds))
    classes = np.clip(np.searchsorted(np.quantile(value, [0.2, 0.4, 0.6, 0.8]), value), 0, len(ramp) - 1)
    canvas = ramp[classes[labels]].copy()
    outside = ~_inset_shape(rng, size)
    _paint(canvas, outside, _jitter(rng, (222, 222, 218), 4))  # neighbouring states in grey
    _paint(canvas, _edges(labels) & ~outside, (110, 110, 110), 0.8)
    _paint(canvas, _thicken(_edges(outside.astype(int)), 2), (30, 30, 30))
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    _legend(draw, rng, size, ramp)
    _neatline(draw, size)
    return image


def _inset_shape(rng: np.random.Generator, size: int) -> Array:
    """A state-like outline: a blob filling most of the map, with straight and ragged sides."""
    x, y = _coords(size)
    ragged = (_noise(rng, size, 4, 3) - 0.5) * 0.12
    half_w, half_h = rng.uniform(0.36, 0.46, 2)
    cx, cy = rng.uniform(0.45, 0.55, 2)
    return (np.abs(x - cx) + ragged * (rng.random() < 0.5) < half_w) & (np.abs(y - cy) + ragged < half_h)


def _legend(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, ramp: Array) -> None:
    """Legend box with one swatch per class, in a random corner."""
    box_w, box_h = size * 0.26, size * 0.3
    left = size * 0.04 if rng.random() < 0.5 else size * 0.96 - box_w
    top = size * 0.04 if rng.random() < 0.5 else size * 0.96 - box_h
    draw.rectangle([left, top, left + box_w, top + box_h], fill=(255, 255, 255), outline=(0, 0, 0))
    step = box_h / (len(ramp) + 1)
    font = _font(size, 6)
    low = int(rng.integers(1, 20))
    for k, colour in enumerate(ramp):
        y0 = top + step * (k + 0.6)
        draw.rectangle([left + 4, y0, left + 4 + step * 0.9, y0 + step * 0.8],
                       fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        _text(draw, (left + 8 + step, y0), f"{low * 2 ** k}-{low * 2 ** (k + 1)}", fill=(0, 0, 0), font=font)


def draw_manuscript(rng: np.random.Generator, size: int) -> Image.Image:
    """Manuscript map: sepia aged paper, wobbly ink coast with ripple lines, watercolour wash,
    stains and a darkened vignette."""
    x, y = _coords(size)
    paper = np.array(_jitter(rng, (222, 198, 150), 8), np.float32)
    grain = _noise(rng, size, 8, 3) - 0.5
    canvas = paper * (1 + 0.12 * grain)[..., None] * np.ones((1, 1, 3), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    field = _noise(rng, size, 3, 4, 0.45) + 0.9 * (x * math.cos(angle) + y * math.sin(angle))
    coast = np.quantile(field, rng.uniform(0.35, 0.6))
    land = field > coast
    _note_water(~land)
    wash = _jitter(rng, [(150, 170, 100), (206, 140, 120), (196, 180, 90)][int(rng.integers(3))], 10)
    inland = np.clip(1 - (field - coast) / 0.1, 0, 1) * land  # colour fades inland, as brushed
    _paint(canvas, inland, wash, 0.6)
    offshore = np.clip(1 - (coast - field) / 0.08, 0, 1) * ~land
    _paint(canvas, offshore, _jitter(rng, (150, 170, 150), 8), 0.35)
    ink = _jitter(rng, (70, 45, 25), 8)
    for k in range(1, 4):  # ripple lines offshore, drawn by hand parallel to the coast
        ripple = field < coast - 0.02 * k
        _paint(canvas, _edges(ripple.astype(int)), ink, 0.7 / k)
    _paint(canvas, _thicken(_edges(land.astype(int)), 2), ink, 0.9)
    for _ in range(int(rng.integers(2, 6))):  # stains
        sx, sy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.18)
        stain = np.clip(1 - ((x - sx) ** 2 + (y - sy) ** 2) / r ** 2, 0, 1) ** 0.5
        _paint(canvas, stain, (150, 110, 60), rng.uniform(0.15, 0.35))
    vignette = np.clip(((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2.2, 0, 1) ** 1.5
    _paint(canvas, vignette, (120, 80, 40), 0.7)
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    _rivers(draw, rng, size, land, ink)
    _molehills(draw, rng, size, land, ink)
    _labels(draw, rng, size, MANUSCRIPT_WORDS, int(rng.integers(2, 5)), ink, 8)
    if rng.random() < 0.6:  # a plain cartouche, ruled by hand
        left, top = rng.uniform(0.05, 0.6) * size, rng.uniform(0.05, 0.75) * size
        box = [left, top, left + size * 0.32, top + size * 0.16]
        draw.rectangle(box, outline=tuple(ink), width=2)
        draw.rectangle([box[0] + 3, box[1] + 3, box[2] - 3, box[3] - 3], outline=tuple(ink), width=1)
        _text(draw, (box[0] + 7, box[1] + 8), "A Draught", fill=tuple(ink), font=_font(size, 9))
    return image.filter(ImageFilter.GaussianBlur(0.4))


def _molehills(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, land: Array, ink) -> None:
    """Hills drawn in profile as little ink humps, the way pre-contour maps showed relief."""
    land_pixels = np.argwhere(land)
    if not len(land_pixels):
        return
    width = size * 0.035
    for y, x in land_pixels[rng.integers(len(land_pixels), size=int(rng.integers(6, 18)))]:
        draw.arc([x - width, y - width * 0.7, x + width, y + width * 0.7], 190, 350, fill=tuple(ink), width=1)


def _rivers(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, land: Array, ink) -> None:
    """Wobbly random-walk rivers starting on land, in the manuscript's ink."""
    land_pixels = np.argwhere(land)
    if not len(land_pixels):
        return
    for _ in range(int(rng.integers(1, 4))):
        y, x = land_pixels[rng.integers(len(land_pixels))].astype(float)
        heading = rng.uniform(0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(40):
            heading += rng.normal(0, 0.35)
            x, y = x + 3 * math.cos(heading) * size / 256, y + 3 * math.sin(heading) * size / 256
            points.append((x, y))
        draw.line(points, fill=tuple(ink), width=1)


GEOLOGY = [
    (232, 112, 112), (244, 176, 84), (168, 204, 104), (120, 164, 220), (196, 140, 208),
    (250, 228, 100), (176, 116, 92), (120, 200, 180), (236, 140, 180),
]


def draw_geological(rng: np.random.Generator, size: int) -> Image.Image:
    """Geological map: folded strata in saturated unit colours, hatched and stippled formations,
    intrusions, black faults, and a stratigraphic legend column (a stack of unit boxes, youngest
    on top) down one side: banded, patterned and columnar, unlike a choropleth's flat fills."""
    x, y = _coords(size)
    angle = rng.uniform(0, math.pi)
    fold = (_noise(rng, size, 2, 4) - 0.5) * rng.uniform(0.6, 1.2)
    field = x * math.cos(angle) + y * math.sin(angle) + fold
    width = rng.uniform(0.06, 0.12)
    units = np.floor(field / width).astype(int)
    order = rng.permutation(len(GEOLOGY))
    palette = np.array([_jitter(rng, GEOLOGY[i], 10) for i in order], np.float32)
    units = np.where(_noise(rng, size, 4, 3) > rng.uniform(0.8, 0.9), -1, units)  # intrusions
    canvas = palette[units % len(palette)]
    _paint(canvas, units == -1, (210, 40, 60))
    _paint(canvas, _edges(units), (40, 30, 30), 0.8)
    stipple = (rng.random((size, size)) < 0.15) & (units % 3 == 0)
    _paint(canvas, stipple, (60, 40, 40), 0.5)
    # Ruled patterns overprint some formations (limestone, shale...), in two directions.
    period = max(3, size // 40)
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    _paint(canvas, (((cols + rows) % period) == 0) & (units % 3 == 1), (50, 35, 35), 0.6)
    _paint(canvas, (((cols - rows) % period) == 0) & (units % 4 == 2), (50, 35, 35), 0.5)
    image = _image(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):  # faults cut across the strata
        a = rng.uniform(0, math.pi)
        px, py = rng.uniform(0.2, 0.8, 2) * size
        dx, dy = math.cos(a) * size, math.sin(a) * size
        draw.line([(px - dx, py - dy), (px + dx, py + dy)], fill=(0, 0, 0), width=max(2, size // 100))
    _labels(draw, rng, size, SYMBOLS, int(rng.integers(3, 7)), (0, 0, 0))
    _strat_column(draw, rng, size, palette)
    _neatline(draw, size)
    return image


def _strat_column(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, palette: Array) -> None:
    """The legend of a geological map: a tall column of formation boxes, one per unit colour,
    each with its symbol, on a white strip along the left or right edge."""
    width = size * rng.uniform(0.16, 0.2)
    left = size * 0.02 if rng.random() < 0.5 else size * 0.98 - width
    top, bottom = size * 0.04, size * 0.96
    draw.rectangle([left, top, left + width, bottom], fill=(250, 248, 240), outline=(0, 0, 0))
    units = min(len(palette), int(rng.integers(6, 9)))
    step = (bottom - top) / units
    font = _font(size, 6)
    for k in range(units):
        y0 = top + k * step
        box = [left + 3, y0 + 2, left + width * 0.45, y0 + step - 2]
        draw.rectangle(box, fill=tuple(int(c) for c in palette[k]), outline=(0, 0, 0))
        if k % 3 == 1:  # the column repeats the map's patterns
            for hx in np.arange(box[0], box[2], max(3, size // 40)):
                draw.line([(hx, box[1]), (min(hx + (box[3] - box[1]), box[2]), box[3])], fill=(50, 35, 35))
        _text(draw, (left + width * 0.52, y0 + step * 0.25), str(SYMBOLS[k % len(SYMBOLS)]), fill=(0, 0, 0),
              font=font)


SYMBOLS = ["Qal", "Tg", "Kd", "Jm", "Pc", "Ob", "Cm", "pC", "Dv"]


SANBORN = {"frame": (246, 214, 92), "brick": (232, 146, 136), "stone": (136, 170, 214), "iron": (180, 180, 180)}


def draw_fire_insurance(rng: np.random.Generator, size: int) -> Image.Image:
    """Fire insurance plan: white sheet, wide streets, building footprints coloured by
    construction (yellow frame, pink brick, blue stone) with black outlines."""
    image = Image.new("RGB", (size, size), _jitter(rng, (248, 246, 238), 3))
    draw = ImageDraw.Draw(image)
    street = size * rng.uniform(0.06, 0.09)
    block_w, block_h = size * rng.uniform(0.3, 0.45), size * rng.uniform(0.25, 0.4)
    x0, y0 = -rng.uniform(0, block_w), -rng.uniform(0, block_h)
    weights = rng.dirichlet([6, 3, 1, 0.5])
    kinds = list(SANBORN)
    outline = (50, 40, 40)
    for bx in np.arange(x0, size, block_w + street):
        for by in np.arange(y0, size, block_h + street):
            draw.rectangle([bx, by, bx + block_w, by + block_h], outline=outline, width=1)
            lot_w = block_w / int(rng.integers(4, 8))
            for side in (0, 1):  # lots front onto the two long sides of the block
                for lx in np.arange(bx, bx + block_w - 1, lot_w):
                    if rng.random() < 0.2:
                        continue  # vacant lot
                    depth = block_h * rng.uniform(0.2, 0.45)
                    top = by + 1 if side == 0 else by + block_h - 1 - depth
                    colour = SANBORN[kinds[int(rng.choice(4, p=weights))]]
                    box = [lx + 1, top, lx + lot_w - 1, top + depth]
                    draw.rectangle(box, fill=_jitter(rng, colour, 6), outline=outline)
                    if rng.random() < 0.3:
                        draw.line([box[0], box[1], box[2], box[3]], fill=outline)
    font = _font(size, 7)
    for _ in range(int(rng.integers(2, 4))):
        _text(draw, (int(rng.integers(0, size * 3 // 4)), int(rng.integers(0, size * 9 // 10))),
              str(rng.choice(STREETS)).upper(), fill=(30, 30, 30), font=font)
    _text(draw, (size * 0.86, size * 0.03), str(int(rng.integers(1, 60))), fill=(0, 0, 0), font=_font(size, 14))
    _neatline(draw, size, (0, 0, 0))
    return image


DRAWERS: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "relief": draw_relief,
    "political": draw_political,
    "street_plan": draw_street_plan,
    "nautical": draw_nautical,
    "choropleth": draw_choropleth,
    "manuscript": draw_manuscript,
    "geological": draw_geological,
    "fire_insurance": draw_fire_insurance,
}


# --------------------------------------------------------------------------------------------
# Catalogue metadata
# --------------------------------------------------------------------------------------------

PEAKS = ["Washington", "Mansfield", "Marcy", "Elbert", "Rainier", "Katahdin", "Mitchell", "Whitney", "Hood"]
CITIES = [
    "Savannah, Georgia", "Charleston, South Carolina", "Richmond, Virginia", "Hartford, Connecticut",
    "Providence, Rhode Island", "Albany, New York", "Cincinnati, Ohio", "Louisville, Kentucky",
    "Mobile, Alabama", "Natchez, Mississippi", "Portland, Maine", "Burlington, Vermont",
    "Galveston, Texas", "Sacramento, California", "Denver, Colorado", "St. Paul, Minnesota",
]
CAPITALS = ["Aldern", "Brava", "Corvin", "Dunmore", "Estra", "Ferrol", "Galen", "Hadria", "Istra", "Kovel"]
STREETS = ["Main St.", "Broad St.", "Water St.", "Market St.", "Elm St.", "Church St.", "High St.", "Bay St."]
HEADLANDS = ["Pt. Judith", "Cape Ann", "Sandy Hook", "Cape Fear", "Pt. Lookout", "Cape May"]
MANUSCRIPT_WORDS = ["Fort", "Indian Path", "Mill", "Ferry", "Swamp", "Plantation", "Falls", "Meeting Ho."]

RELIEF_PLACES = [
    ("the Green Mountains", "Vermont"), ("the White Mountains", "New Hampshire"),
    ("the Adirondack Mountains", "New York"), ("the Front Range", "Colorado"),
    ("the Great Smoky Mountains", "Tennessee"), ("Mount Rainier National Park", "Washington"),
    ("the Sierra Nevada", "California"), ("the Black Hills", "South Dakota"),
    ("the Swiss Alps", "Switzerland"), ("the Pyrenees", "Spain"),
]
POLITICAL_PLACES = [
    ("the Balkan states", "Balkan Peninsula"), ("Europe", "Europe"), ("South America", "South America"),
    ("the German Empire", "Germany"), ("Central America", "Central America"), ("Africa", "Africa"),
    ("the Austro-Hungarian Monarchy", "Austria"), ("Mexico", "Mexico"), ("the Ottoman Empire", "Turkey"),
    ("the East Indies", "Indonesia"),
]
COASTS = [
    ("Maine", "Cape Elizabeth", "Penobscot Bay"), ("Massachusetts", "Cape Ann", "Cape Cod"),
    ("New Jersey", "Sandy Hook", "Barnegat Inlet"), ("North Carolina", "Cape Hatteras", "Cape Lookout"),
    ("Florida", "St. Augustine", "Cape Canaveral"), ("Texas", "Galveston", "Matagorda Bay"),
    ("California", "Point Reyes", "Monterey Bay"), ("Oregon", "Cape Blanco", "the Columbia River"),
    ("Rhode Island", "Point Judith", "Newport"), ("Virginia", "Cape Henry", "Chesapeake Bay"),
]
THEMES = [
    "population density by county", "the vote for president by county", "illiteracy by county",
    "the value of farm lands by county", "the proportion of foreign-born population",
    "average annual rainfall by county", "the production of wheat by county",
    "the percentage of improved land in farms",
]
STATES = [
    "Ohio", "Indiana", "Illinois", "Iowa", "Kansas", "Kentucky", "Missouri", "Pennsylvania",
    "Georgia", "Texas", "Wisconsin", "Nebraska", "Tennessee", "Virginia",
]
MANUSCRIPT_PLACES = [
    ("the Hudson River valley", "New York"), ("the Connecticut River", "Connecticut"),
    ("the Ohio country", "Ohio"), ("the coast of Carolina", "North Carolina"),
    ("the Mohawk River", "New York"), ("the Chesapeake Bay", "Maryland"),
    ("the Lake Champlain region", "Vermont"), ("the Mississippi River below Natchez", "Mississippi"),
]
GEOLOGY_PLACES = [
    ("the Appalachian coal field", "Pennsylvania"), ("the Black Hills", "South Dakota"),
    ("the Lake Superior region", "Michigan"), ("the Grand Canyon district", "Arizona"),
    ("the Boston basin", "Massachusetts"), ("the Piedmont of Maryland", "Maryland"),
    ("the Yellowstone National Park", "Wyoming"), ("the Taconic region", "New York"),
]

PUBLISHERS = [
    "Hartwell & Pike", "J. T. Merriam", "Colton, Ward & Co.", "Ellery Brothers", "A. B. Thornbury",
    "The Northern Lithographic Co.", "H. L. Goodspeed", "Prentiss & Dale", "W. R. Alcott, surveyor",
    "Eastman Map Co.", "S. Fairbanks, engraver", "G. W. Pellham", "Ravenscroft & Son",
]

TITLE_TEMPLATES = {
    "relief": ["Relief map of {area}, {place}", "Hypsometric map of {area}", "Shaded relief map of {area}, {place}"],
    "political": ["Political map of {area}", "Map of {area} showing political divisions", "{area_cap}"],
    "street_plan": ["Plan of the city of {city}", "Map of the city of {city}, {place}", "Street map of {city}"],
    "nautical": ["Chart of the coast of {place} from {start} to {end}",
                 "{start} to {end}, {place}", "Coast chart of {place}: {start} to {end}"],
    "choropleth": ["Map showing {theme}, {place}", "{place}: {theme_cap}", "Statistical map of {place} showing {theme}"],
    "manuscript": ["Manuscript map of {area}", "[Map of {area}]", "A draught of {area}"],
    "geological": ["Geological map of {area}, {place}", "Geologic map of {area}", "Map showing the geology of {area}"],
    "fire_insurance": ["Insurance maps of {city}, {place}", "Fire insurance map of {city}, {place}",
                       "Insurance plan of the city of {city}"],
}
SUBJECTS = {
    "relief": "Relief maps", "political": "Political maps", "street_plan": "City plans",
    "nautical": "Nautical charts", "choropleth": "Thematic maps", "manuscript": "Manuscript maps",
    "geological": "Geological maps", "fire_insurance": "Fire insurance maps",
}
EXTRA_SUBJECTS = {
    "relief": ["Mountains", "Physical geography"], "political": ["Boundaries", "Administrative and political divisions"],
    "street_plan": ["Streets", "Cities and towns"], "nautical": ["Hydrography", "Coasts"],
    "choropleth": ["Choropleth maps", "Statistics", "Census"], "manuscript": ["Early maps", "Rivers"],
    "geological": ["Geology", "Stratigraphy"], "fire_insurance": ["Buildings", "Insurance, Fire"],
}
NOTES = {
    "relief": ["Relief shown by contours, hypsometric tints and shading.", "Relief shown by layer tints.",
               "Contour interval 100 feet."],
    "political": ["Boundaries shown in colour.", "Capitals marked with red dots.", "Includes inset of colonies."],
    "street_plan": ["Shows streets, wards and public buildings.", "Blocks numbered.", "Shows proposed streets."],
    "nautical": ["Shows soundings in fathoms.", "Soundings in feet at mean low water.", "Includes compass rose."],
    "choropleth": ["Shaded by county according to census returns.", "Includes legend.", "From the census returns."],
    "manuscript": ["Hand coloured.", "Pen-and-ink and watercolour.", "Manuscript on paper; stained."],
    "geological": ["Geological formations shown by colours.", "Shows faults and strike and dip.",
                   "Accompanies survey report."],
    "fire_insurance": ["Buildings coloured by construction material.", "Shows building footprints and fire hydrants.",
                       "Corrected to date by pasted slips."],
}
FORMATS = {"nautical": "chart"}
YEARS = {
    "relief": (1870, 1950), "political": (1840, 1945), "street_plan": (1790, 1920), "nautical": (1820, 1935),
    "choropleth": (1870, 1960), "manuscript": (1690, 1820), "geological": (1840, 1940),
    "fire_insurance": (1867, 1950),
}


def _date(rng: np.random.Generator, kind: str) -> tuple[str, int]:
    """A catalogue-style date string and its year: "1886", "[ca. 1750]", "1912-06", "[1863?]"."""
    low, high = YEARS[kind]
    year = int(rng.integers(low, high + 1))
    style = rng.random()
    if kind == "manuscript" and style < 0.6 or style < 0.15:
        return f"[ca. {year}]", year
    if style < 0.25:
        return f"[{year}?]", year
    if style < 0.45:
        return f"{year}-{int(rng.integers(1, 13)):02d}", year
    return str(year), year


def _catalogue(rng: np.random.Generator, kind: str) -> dict[str, str]:
    """Title, date, place, subjects, contributors, notes and format for one item."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731 - a one-line chooser
    fields: dict[str, str] = {}
    if kind in ("relief", "manuscript", "geological"):
        table = {"relief": RELIEF_PLACES, "manuscript": MANUSCRIPT_PLACES, "geological": GEOLOGY_PLACES}[kind]
        fields["area"], fields["place"] = pick(table)
    elif kind == "political":
        fields["area"], fields["place"] = pick(POLITICAL_PLACES)
    elif kind in ("street_plan", "fire_insurance"):
        fields["city"], fields["place"] = pick(CITIES).split(", ")
    elif kind == "nautical":
        fields["place"], fields["start"], fields["end"] = pick(COASTS)
    elif kind == "choropleth":
        fields["place"], fields["theme"] = pick(STATES), pick(THEMES)
    fields["area_cap"] = fields.get("area", "")[:1].upper() + fields.get("area", "")[1:]
    fields["theme_cap"] = fields.get("theme", "")[:1].upper() + fields.get("theme", "")[1:]
    date, year = _date(rng, kind)
    contributors = [pick(PUBLISHERS)]
    if rng.random() < 0.3:
        contributors.append(pick([p for p in PUBLISHERS if p != contributors[0]]))
    subjects = [SUBJECTS[kind], fields["place"]]
    if rng.random() < 0.5:
        subjects.insert(1, pick(EXTRA_SUBJECTS[kind]))
    return {
        "title": pick(TITLE_TEMPLATES[kind]).format(**fields),
        "date": date,
        "year": str(year),
        "place": fields["place"],
        "subjects": ";".join(subjects),
        "contributors": ";".join(contributors),
        "notes": pick(NOTES[kind]),
        "format": FORMATS.get(kind, "map"),
        "kind": kind,
    }


def _plan(rng: np.random.Generator, count: int) -> list[tuple[str, int]]:
    """(kind, sheets) per item: kinds share the images evenly, ~10% of items are 2-4 sheet
    atlases, and items are shuffled so kinds interleave in file order."""
    kinds = list(KINDS)
    items: list[tuple[str, int]] = []
    for k, kind in enumerate(kinds):
        left = count // len(kinds) + (k < count % len(kinds))
        while left:
            sheets = int(rng.integers(2, min(4, left) + 1)) if left >= 2 and rng.random() < MULTI_SHEET_SHARE else 1
            items.append((kind, sheets))
            left -= sheets
    singles = [kind for kind, sheets in items if sheets == 1]
    if all(sheets == 1 for _, sheets in items) and any(singles.count(kind) >= 2 for kind in singles):
        # Guarantee at least one atlas, so small collections still exercise multi-sheet items.
        kind = next(kind for kind in singles if singles.count(kind) >= 2)
        items.remove((kind, 1))
        items[items.index((kind, 1))] = (kind, 2)
    return [items[i] for i in rng.permutation(len(items))]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def kind_of(row: Mapping | object) -> str | None:
    """The kind key of a metadata row (dict with ``kind``), or one inferred from its subjects
    (a ';'-separated string or a list, e.g. a MapRecord's), or None."""
    get = row.get if isinstance(row, Mapping) else lambda name: getattr(row, name, None)
    kind = get("kind")
    if kind in KINDS:
        return kind
    subjects = get("subjects") or []
    if isinstance(subjects, str):
        subjects = subjects.split(";")
    by_subject = {heading.lower(): key for key, heading in SUBJECTS.items()}
    for subject in subjects:
        if subject.strip().lower() in by_subject:
            return by_subject[subject.strip().lower()]
    return None


def draw_map(kind: str, seed: int | tuple = 0, size: int = 256, *, text: bool = True,
             water: list | None = None) -> Image.Image:
    """One ``size`` x ``size`` image of ``kind``, deterministic for ``seed`` (an int or a tuple of ints).

    ``text`` False: the drawer prints none of its own lettering (the picture is otherwise the same);
    ``water``: a list that receives the water mask (bool, ``size`` x ``size``) of a kind with a coast."""
    printing, noted = _PRINTING.set(text), _WATER.set(water)
    try:
        return DRAWERS[kind](np.random.default_rng(seed), size)
    finally:
        _PRINTING.reset(printing)
        _WATER.reset(noted)


def draw_lettered_map(kind: str, seed: int | tuple, size: int, title: str, printed: list[str],
                      lettering_seed: int | tuple) -> tuple[Image.Image, list[Label]]:
    """A lettered sheet (``lettering.py``): the map of ``kind`` drawn at ``size`` without its own
    small lettering, then lettered with its title, the ``printed`` names and names of its kind;
    returns the image and the labels printed on it (the truth)."""
    water: list = []
    image = draw_map(kind, seed, size, text=False, water=water)
    labels = letter_sheet(image, np.random.default_rng(lettering_seed), kind, title, printed,
                          water[0] if water else None)
    return image, labels


def generate_demo_collection(folder: str | Path, count: int = 360, seed: int = 0, size: int = 256,
                             lettered_per_kind: int = 0, lettered_size: int = LETTERED_SIZE,
                             lettered_kinds: tuple[str, ...] | None = None) -> list[dict]:
    """Write ``count`` JPEG map images and ``metadata.csv`` into ``folder``; return the rows
    exactly as written (all values strings; columns ``COLUMNS``, ``kind`` last).

    Each image has its own random stream derived from (seed, index), so an image does not
    change when another kind's drawing code changes.

    ``lettered_per_kind``: that many single-sheet maps of each kind (the first in file order) are
    lettered sheets of ``lettered_size`` px (``draw_lettered_map``), each printing
    ``NAMES_PER_SHEET`` of ``PRINTED_NAMES`` in turn; what they print, where, is written to
    ``words.csv`` (``lettering.TRUTH_COLUMNS``); ``lettered_kinds``: only these kinds (default all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    rows: list[dict] = []
    lettered: dict[str, int] = {}
    truth: list[dict] = []
    for number, (kind, sheets) in enumerate(_plan(rng, count), start=1):
        item_id = f"demo-{number:04d}"
        catalogue = _catalogue(rng, kind)
        for sheet in range(1, sheets + 1):
            index = len(rows)
            name = f"demo_{index + 1:04d}.jpg"
            if sheets == 1 and lettered.get(kind, 0) < lettered_per_kind and kind in (lettered_kinds or KINDS):
                turn = sum(lettered.values())
                printed = [PRINTED_NAMES[(turn * NAMES_PER_SHEET + k) % len(PRINTED_NAMES)]
                           for k in range(NAMES_PER_SHEET)]
                lettered[kind] = lettered.get(kind, 0) + 1
                image, labels = draw_lettered_map(kind, (seed, 1, index), lettered_size, catalogue["title"], printed,
                                                  (seed, 2, index))
                truth += truth_rows(name, image.size, labels)
            else:
                image = draw_map(kind, (seed, 1, index), size)
            image.save(folder / name, "JPEG", quality=JPEG_QUALITY)
            rows.append({"file": name, "item_id": item_id, "sheet": str(sheet), **catalogue})
    rows = [{column: row[column] for column in COLUMNS} for row in rows]
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if lettered_per_kind:
        write_truth(folder, truth)
    return rows
