"""A grouped bar chart drawn with Pillow: recall@k of random, base and fine-tuned models.

Why Pillow: it is already a dependency; matplotlib would add ~40 MB for one picture.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(160, 160, 160), (70, 120, 190), (230, 130, 40), (90, 170, 90)]
WIDTH, HEIGHT = 900, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 20, 50, 90


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def bar_chart(groups: list[str], series: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """``series``: name -> one value in [0, 1] per group.  Writes a PNG and returns its path."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(12)
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    bottom = MARGIN_TOP + plot_h
    if title:
        draw.text((MARGIN_LEFT, 12), title, fill="black", font=font)
    for tick in range(0, 11, 2):  # y axis: 0.0 .. 1.0
        y = bottom - plot_h * tick / 10
        draw.line([(MARGIN_LEFT, y), (WIDTH - MARGIN_RIGHT, y)], fill=(225, 225, 225))
        draw.text((MARGIN_LEFT - 8, y), f"{tick / 10:.1f}", fill="black", font=small, anchor="rm")
    draw.line([(MARGIN_LEFT, MARGIN_TOP), (MARGIN_LEFT, bottom), (WIDTH - MARGIN_RIGHT, bottom)], fill="black")
    names = list(series)
    group_w = plot_w / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(names))
    for g, group in enumerate(groups):
        x0 = MARGIN_LEFT + g * group_w + group_w * 0.1
        for s, name in enumerate(names):
            value = min(1.0, max(0.0, float(series[name][g])))
            left = x0 + s * bar_w
            top = bottom - plot_h * value
            draw.rectangle([left, top, left + bar_w - 2, bottom], fill=COLOURS[s % len(COLOURS)])
            draw.text((left + bar_w / 2, top - 2), f"{value:.2f}", fill="black", font=_font(10), anchor="mb")
        draw.text((x0 + group_w * 0.4, bottom + 8), group, fill="black", font=small, anchor="ma")
    legend_x = MARGIN_LEFT
    for s, name in enumerate(names):
        y = HEIGHT - 30
        draw.rectangle([legend_x, y, legend_x + 14, y + 14], fill=COLOURS[s % len(COLOURS)])
        draw.text((legend_x + 20, y + 7), name, fill="black", font=small, anchor="lm")
        legend_x += 30 + draw.textlength(name, font=small)
    path = Path(path)
    image.save(path, "PNG")
    return path
