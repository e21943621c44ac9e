"""A fixed probe set for checking exported query encoders against open_clip: 520 varied texts and 100
images, made here (no files, no network) and the same on every machine.

The texts are what people type into a map search (kinds, places, years, scales, languages with
accents, punctuation, HTML entities, curly quotes, over-long texts); the images are map-like
drawings (coasts, rivers, grids, hatching, lettering at angles), flat colours and noise, at several
sizes and aspect ratios, so resizing and cropping are exercised too.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

KINDS = ["map", "nautical chart", "relief map", "city street plan", "fire insurance plan", "geological map",
         "thematic choropleth map", "hand-drawn manuscript map", "railroad map", "bird's-eye view", "atlas page",
         "topographic quadrangle", "panoramic view", "military map", "land ownership map", "road map"]
PLACES = ["Maine", "Cape Fear", "Frederick County", "the Alps", "Évora", "São Paulo", "Zürich", "Kraków",
          "Reykjavík", "the Mississippi River", "Chesapeake Bay", "Hokkaidō", "Île de la Cité", "Москва",
          "القاهرة", "東京", "Puerto Rico", "the Great Lakes", "Ōsaka", "Ciudad de México"]
EXTRAS = ["", " 1850", ", 1776-1783", " (1:63,360)", " — detailed", "; with soundings", " & vicinity",
          " &amp; environs", " “annotated”", " in colour"]
ODD = ["", " ", "x", "1", "MAP", "Map Of The WORLD", "it's the coast's lighthouse", "I'M HERE, YOU'LL SEE",
       "tab\tand\nnewline", "emoji 🗺️ map 🧭", "ＦＵＬＬＷＩＤＴＨ ﬁle", "<start_of_text> inside <end_of_text>",
       "&lt;b&gt;bold&lt;/b&gt;", "ŐŰ ǅ İstanbul", "Straße 12½", "a" * 300,
       "a very long description of a county map showing roads, railroads, churches, schools, mills, " * 6,
       "ordnance survey sheet 42 / 1:2500 / revised 1911", "N 40° 26′ 46″ W 79° 58′ 56″", "?!.,;:"]


def probe_texts() -> list[str]:
    """At least 500 texts, always the same."""
    texts = list(ODD)
    for i, kind in enumerate(KINDS):
        for j, place in enumerate(PLACES):
            extra = EXTRAS[(i + j) % len(EXTRAS)]
            texts.append(f"{kind} of {place}{extra}" if (i + j) % 3 else f"{place} {kind}{extra}")
    for year in range(1600, 1960, 20):
        texts.append(f"{KINDS[year % len(KINDS)]} {year}")
    return texts[:520] if len(texts) >= 520 else texts + [f"map number {n}" for n in range(520 - len(texts))]


def _map_drawing(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    paper = tuple(int(v) for v in rng.integers(200, 250, 3))
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    water = (int(rng.integers(90, 160)), int(rng.integers(150, 200)), int(rng.integers(200, 240)))
    # a coast: one side is sea
    points = [(0, height * (0.3 + 0.4 * rng.random()))]
    for x in range(0, width + 20, 20):
        points.append((x, points[-1][1] + rng.normal(0, height / 30)))
    draw.polygon(points + [(width, height), (0, height)], fill=water)
    draw.line(points, fill=ink, width=2)
    # hatching along the coast, a river, a grid, lettering at angles
    for k in range(0, width, 6):
        draw.line([(k, points[min(k // 20, len(points) - 1)][1]), (k + 4, points[min(k // 20, len(points) - 1)][1] + 6)],
                  fill=ink)
    river = [(rng.random() * width, 0)]
    for _ in range(12):
        river.append((river[-1][0] + rng.normal(0, width / 15), river[-1][1] + height / 12))
    draw.line(river, fill=water, width=3)
    step = int(rng.integers(30, 80))
    for x in range(0, width, step):
        draw.line([(x, 0), (x, height)], fill=(150, 150, 150))
    for y in range(0, height, step):
        draw.line([(0, y), (width, y)], fill=(150, 150, 150))
    for n in range(int(rng.integers(3, 9))):
        label = Image.new("RGBA", (90, 16), (0, 0, 0, 0))
        ImageDraw.Draw(label).text((2, 2), f"PLACE {seed}-{n}", fill=ink + (255,))
        label = label.rotate(float(rng.uniform(-60, 60)), expand=True)
        image.paste(label, (int(rng.random() * max(1, width - 90)), int(rng.random() * max(1, height - 60))), label)
    return image


def probe_images() -> list[Image.Image]:
    """100 images, always the same: 80 map-like drawings and 20 others (flat, gradient, noise)."""
    sizes = [(320, 240), (240, 320), (512, 512), (700, 300), (96, 96), (1024, 700), (64, 200), (450, 450)]
    images = [_map_drawing(seed, sizes[seed % len(sizes)]) for seed in range(80)]
    rng = np.random.default_rng(1234)
    for n in range(20):
        width, height = sizes[n % len(sizes)]
        if n % 3 == 0:
            image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        elif n % 3 == 1:
            ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
            angle = math.radians(30 * n)
            ramp[..., 1] = ramp[..., 1] * abs(math.cos(angle))
            image = Image.fromarray(ramp.astype(np.uint8))
        else:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        images.append(image)
    return images
