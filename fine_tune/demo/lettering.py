"""The demo's lettered sheets: place names printed on a map at a size where lettering is realistic,
and the truth of what was printed where, against which the demo scores OCR.

A lettered sheet is one of the demo's maps drawn at ``LETTERED_SIZE`` (1,024 px) without the
drawer's own small lettering, then lettered here: its catalogue title, a few of ``PRINTED_NAMES``
(the names the demo searches for) and names that suit its kind, in DejaVu and Liberation fonts
(Pillow's own font where neither is installed), set

  horizontally at 11-30 px (font size), rotated by 20-40 degrees, vertically (both ways),
  letter by letter along a curve (along the coast on maps that have one), faint (about 1.8:1
  against the paper under it), or over a hatched patch (marsh or woods, ruled every 5-8 px).

Names are kept apart (their bounds 12 px or more from each other), so each word read belongs to
one label.  Every label becomes ``words.csv`` rows next to ``metadata.csv``: one row per label,
with its text, style, angle, font size, font, and its outline.  ``score_sheet`` compares what OCR
read with it, as ``bench/ocr_bench.py`` scores its drawn sheets: a reading belongs to the label
whose bounds cover most of its box (at least 30 %); a truth word is found when a reading of its
label holds it; a word read is right when its label holds it (words read where no label is are
wrong).  Words are compared with case, accents and punctuation folded.
"""

from __future__ import annotations

import csv
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LETTERED_SIZE = 1024
TRUTH_FILE = "words.csv"
TRUTH_COLUMNS = ("file", "image_width", "image_height", "label", "text", "style", "angle", "px", "font",
                 "faint", "hatched", "x", "y", "w", "h", "outline")

# Searched for by the demo's evaluation: each lettered sheet prints three of them, in any style.
PRINTED_NAMES = ["Cape Fear", "Frederick", "Hagerstown", "Chesapeake Bay", "Smith Island", "Pocomoke",
                 "Antietam", "Sandy Hook"]
NAMES_PER_SHEET = 3

# Place names any kind of map may print (none shares a word with PRINTED_NAMES, so a search for
# one of those finds only the sheets that print it).
PLACES = """Cumberland Annapolis Baltimore Salisbury Easton Cambridge Elkton Westminster Rockville Towson
Bel_Air Wilmington Beaufort Hatteras New_Bern Kitty_Hawk Manteo Morehead Jacksonville Fayetteville Lumberton
Whiteville Southport Potomac Patuxent Choptank Nanticoke Susquehanna Monocacy Sharpsburg Boonsboro Emmitsburg
Taneytown Thurmont Middletown Brunswick Poolesville Gaithersburg Laurel Bowie Waldorf La_Plata Leonardtown
Solomons North_Beach Crisfield Princess_Anne Snow_Hill Berlin Chincoteague Assateague Tangier_Sound
Blackwater Vienna Federalsburg Denton Greensboro Centreville Chestertown Rock_Hall Aberdeen Port_Deposit
Rising_Sun Oakland Grantsville Frostburg Lonaconing Westernport Hancock Clear_Spring Williamsport Cascade
Harmony Ridgely Goldsboro Kinston Greenville Plymouth Edenton Hertford Camden Currituck Rodanthe Ocracoke
Swan_Quarter Belhaven Bath Aurora Oriental Havelock Swansboro Topsail Burgaw Wallace Clinton Dunn Benson
Selma Wilson Tarboro Enfield Halifax Weldon Murfreesboro Ahoskie Windsor Williamston Columbia Albemarle
Neuse Tar_River""".split()
PLACES = [name.replace("_", " ") for name in PLACES]
KIND_NAMES = {
    "relief": ["Mt. Washington", "Mt. Marcy", "Mt. Mitchell", "Mt. Whitney", "Blue Ridge", "Catoctin Mtn.",
               "South Mountain", "Sugarloaf", "Elk Ridge", "Big Savage"],
    "political": ["Aldern", "Brava", "Corvin", "Dunmore", "Estra", "Ferrol", "Galen", "Hadria", "Istra", "Kovel"],
    "street_plan": ["MAIN ST.", "BROAD ST.", "Water St.", "Market St.", "Elm St.", "Church St.", "High St.",
                    "City Hall", "Court House", "Market Square"],
    "nautical": ["Cape Lookout", "Cape Henry", "Pt. Lookout", "Barnegat Inlet", "Pamlico Sound", "Bodie Island",
                 "Ocean View", "Shoal Water", "Diamond Shoals", "Outer Bar"],
    "choropleth": ["Adams", "Allegany", "Carroll", "Garrett", "Howard", "Kent", "Queen Anne's", "Somerset",
                   "Talbot", "Worcester"],
    "manuscript": ["Fort", "Indian Path", "Mill", "Ferry", "Swamp", "Plantation", "Falls", "Meeting Ho.",
                   "Old Field", "Landing"],
    "geological": ["Trenton Limestone", "Martinsburg Shale", "Oriskany Sandstone", "Catskill", "Marcellus",
                   "Tuscarora", "Juniata", "Helderberg", "Onondaga", "Pocono"],
    "fire_insurance": ["MAIN ST.", "MARKET ST.", "WATER ST.", "Warehouse", "Livery", "Foundry", "Hotel",
                       "Dwelling", "Planing Mill", "Depot"],
}

FONT_FILES = [
    "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSerif.ttf", "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSerif-Italic.ttf",
    "liberation/LiberationSans-Regular.ttf", "liberation/LiberationSerif-Regular.ttf",
    "liberation/LiberationSerif-Italic.ttf", "liberation/LiberationSansNarrow-Regular.ttf",
]
FONT_FOLDERS = [Path("/usr/share/fonts/truetype"), Path("/usr/share/fonts")]
BUNDLED_FONT = "pillow-default"  # Pillow's own font, where neither DejaVu nor Liberation is installed

# Styles of label and how often each is drawn; "small": horizontal under 14 px.
STYLES = {"horizontal": 0.43, "small": 0.07, "rotated": 0.12, "vertical": 0.08, "curved": 0.14,
          "faint": 0.08, "hatched": 0.08}
MIN_HORIZONTAL_PX = 14  # the line: horizontal labels at least 14 px high
GAP = 12  # px between labels' bounds
EDGE = 24  # px kept free along the sheet's edges (the neatline)
DARK_INK = [(20, 20, 20), (45, 35, 30), (40, 40, 110)]
WATER_INK = (30, 50, 120)
HALO = (248, 244, 232)


def font_files() -> list[str]:
    """The fonts installed here, by path; [BUNDLED_FONT] when none is."""
    found = []
    for name in FONT_FILES:
        for folder in FONT_FOLDERS:
            for path in (folder / name, folder / Path(name).name):
                if path.is_file():
                    found.append(str(path))
                    break
            else:
                continue
            break
    return found or [BUNDLED_FONT]


def load_font(path: str, px: int) -> ImageFont.ImageFont:
    if path == BUNDLED_FONT:
        return ImageFont.load_default(size=px)
    return ImageFont.truetype(path, px)


@dataclass
class Label:
    """One name printed on a sheet: its text, how it was set, and its outline (pixels)."""

    text: str
    style: str  # horizontal | rotated | vertical | curved
    angle: float  # reading direction, degrees counter-clockwise from left-to-right (curved: at its middle)
    px: int  # font size in px
    font: str  # font file name
    outline: list = field(default_factory=list)  # [(x, y), ...] in sheet pixels
    faint: bool = False
    hatched: bool = False

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        xs, ys = [p[0] for p in self.outline], [p[1] for p in self.outline]
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def group(self) -> str:
        """The kind of label the evaluation reports it under."""
        if self.style == "horizontal":
            if self.faint:
                return "faint"
            if self.hatched:
                return "over hatching"
            return "horizontal, 14 px and over" if self.px >= MIN_HORIZONTAL_PX else "horizontal, under 14 px"
        return self.style


GROUPS = ["horizontal, under 14 px", "horizontal, 14 px and over", "faint", "over hatching", "rotated", "vertical",
          "curved"]
HORIZONTAL_14 = ["horizontal, 14 px and over", "faint", "over hatching"]
ROTATED = ["rotated", "vertical", "curved"]


# -- drawing -------------------------------------------------------------------------------------

def luminance(pixels: np.ndarray) -> float:
    return float((pixels[..., :3] @ np.array([0.299, 0.587, 0.114])).mean()) if pixels.size else 0.0


def convex_hull(points) -> list[tuple[float, float]]:
    """Andrew's monotone chain: the hull of a curved label's letters, counter-clockwise."""
    points = sorted(set((float(x), float(y)) for x, y in points))
    if len(points) < 3:
        return points

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def turned_box(width: float, height: float, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Corners of a width x height box turned ``angle`` degrees counter-clockwise about (cx, cy)."""
    a = math.radians(angle)
    corners = [(-width / 2, -height / 2), (width / 2, -height / 2), (width / 2, height / 2), (-width / 2, height / 2)]
    return [(cx + x * math.cos(a) + y * math.sin(a), cy - x * math.sin(a) + y * math.cos(a)) for x, y in corners]


class Sheet:
    """A picture being lettered: where labels went, the hatched patches, the water (if any)."""

    def __init__(self, image: Image.Image, rng: np.random.Generator, water: np.ndarray | None):
        self.image = image
        self.rng = rng
        self.water = water
        self.pixels = np.asarray(image.convert("RGB"), np.float32)
        self.taken: list[tuple[float, float, float, float]] = []
        self.hatched: list[tuple[int, int, int, int]] = []
        self.labels: list[Label] = []
        self.fonts = font_files()

    @property
    def size(self) -> int:
        return self.image.width

    def free(self, box, hatched: bool = False) -> bool:
        """Whether a label's bounds fit here: inside the edges, apart from other labels, and off the
        hatched patches unless it is a name set over hatching (so only those are)."""
        x0, y0, x1, y1 = box
        if x0 < EDGE or y0 < EDGE or x1 > self.image.width - EDGE or y1 > self.image.height - EDGE:
            return False
        if not hatched and any(not (x1 < a0 or a1 < x0 or y1 < b0 or b1 < y0) for a0, b0, a1, b1 in self.hatched):
            return False
        return all(x1 + GAP < a0 or a1 + GAP < x0 or y1 + GAP < b0 or b1 + GAP < y0 for a0, b0, a1, b1 in self.taken)

    def under(self, box) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self.pixels[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]

    def font(self, px: int, italic_water: bool = False) -> tuple[ImageFont.ImageFont, str]:
        choices = [f for f in self.fonts if "Italic" in f] if italic_water else []
        path = str(self.rng.choice(choices or self.fonts))
        return load_font(path, px), Path(path).name

    def paste(self, mask: Image.Image, xy: tuple[int, int], colour) -> None:
        self.image.paste(Image.new("RGB", mask.size, tuple(int(c) for c in colour)), xy, mask)

    def take(self, box, label: Label) -> None:
        self.taken.append(box)
        self.labels.append(label)

    # -- hatched patches (marsh, woods): names are set over some of them ----------------------
    def hatch(self, count: int) -> None:
        draw = ImageDraw.Draw(self.image)
        size = self.size
        for _ in range(count):
            for _ in range(50):
                w, h = int(size * self.rng.uniform(0.25, 0.38)), int(size * self.rng.uniform(0.12, 0.2))
                x0, y0 = (int(v) for v in self.rng.integers(EDGE, [size - EDGE - w, size - EDGE - h]))
                box = (x0, y0, x0 + w, y0 + h)
                if luminance(self.under(box)) >= 165 and not any(
                        not (box[2] < a[0] or a[2] < box[0] or box[3] < a[1] or a[3] < box[1]) for a in self.hatched):
                    break
            else:
                continue
            spacing = int(self.rng.choice([5, 6, 8]))
            colour = tuple(int(c) for c in self.rng.choice([(80, 110, 80), (90, 90, 70), (70, 90, 120)]))
            for offset in range(-h, w, spacing):
                draw.line([(x0 + max(offset, 0), y0 + max(-offset, 0)),
                           (x0 + min(offset + h, w), y0 + min(h, w - offset))], fill=colour, width=1)
            self.hatched.append(box)
        self.pixels = np.asarray(self.image, np.float32)

    # -- one label ----------------------------------------------------------------------------
    def straight(self, text: str, style: str, px: int, angle: float = 0.0, *, faint: bool = False,
                 hatched: bool = False, water: bool = False, within: list | None = None,
                 tries: int = 150) -> Label | None:
        """A label set in a straight line at ``angle``; placed where it fits (in a hatched patch,
        on water for water names, inside one of the ``within`` boxes, when asked)."""
        font, font_name = self.font(px, italic_water=water)
        left, top, right, bottom = font.getbbox(text)
        pad = 4
        mask = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=font, fill=255)
        halo_mask = mask.filter(ImageFilter.MaxFilter(5))
        turned = mask.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        halo = halo_mask.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        width, height = turned.size
        for _ in range(tries):
            areas = self.hatched if hatched else within
            if areas is not None:
                if not areas:
                    return None
                hx0, hy0, hx1, hy1 = areas[int(self.rng.integers(len(areas)))]
                if hx1 - hx0 < width or hy1 - hy0 < height:
                    continue
                x = int(self.rng.integers(hx0, hx1 - width + 1))
                y = int(self.rng.integers(hy0, hy1 - height + 1))
            else:
                x = int(self.rng.integers(0, max(1, self.size - width)))
                y = int(self.rng.integers(0, max(1, self.size - height)))
            box = (x, y, x + width, y + height)
            if not self.free(box, hatched):
                continue
            if water and not self.on_water([(x + width / 2, y + height / 2), (x + 4, y + 4),
                                            (x + width - 4, y + height - 4)]):
                continue
            background = self.under(box).reshape(-1, 3).mean(0)
            light = luminance(background) >= 150
            if faint:
                if luminance(background) < 170:
                    continue
                colour = background * 0.56  # about 1.8:1 against the paper under it
            else:
                colour = WATER_INK if water else DARK_INK[int(self.rng.integers(len(DARK_INK)))]
                if not light and not hatched:
                    self.paste(halo, (x, y), HALO)  # a light halo, as maps print names over dark fills
            self.paste(turned, (x, y), colour)
            outline = turned_box(mask.width - 2 * pad, mask.height - 2 * pad, angle, x + width / 2, y + height / 2)
            style_name = {0: "horizontal", 90: "vertical", -90: "vertical"}.get(int(angle), "rotated")
            label = Label(text, style_name, float(angle), px, font_name, outline, faint=faint, hatched=hatched)
            self.take(box, label)
            return label
        return None

    def on_water(self, points) -> bool:
        if self.water is None:
            return False
        h, w = self.water.shape
        return all(0 <= int(y) < h and 0 <= int(x) < w and self.water[int(y), int(x)] for x, y in points)

    def curved(self, text: str, px: int, tries: int = 150) -> Label | None:
        """A label set letter by letter along a circular arc: along the coast (in the water, bending
        with it) where the map has one, elsewhere a gentle arc as names follow rivers and ranges."""
        font, font_name = self.font(px, italic_water=self.water is not None)
        advance = sum(font.getlength(ch) for ch in text) + 1.0 * (len(text) - 1)
        coast = self.coast_points() if self.water is not None else None
        for _ in range(tries):
            radius = self.size * float(self.rng.uniform(0.3, 0.6))
            if coast is not None and len(coast[0]):
                k = int(self.rng.integers(len(coast[0])))
                py, px_, nx, ny = coast[0][k], coast[1][k], coast[2][k], coast[3][k]
                phi = math.atan2(-ny, nx)  # the normal into the water, counter-clockwise from +x
                offset = px * 0.9 + 6
                mx, my = px_ + nx * offset, py + ny * offset
            else:
                phi = math.radians(float(self.rng.uniform(60, 120)) * (1 if self.rng.random() < 0.6 else -1))
                mx, my = (float(v) for v in self.rng.uniform(EDGE + advance / 2, self.size - EDGE - advance / 2, 2))
            convex = math.sin(phi) > 0
            if abs(math.sin(phi)) < math.sin(math.radians(35)):
                continue  # the text would read too steeply
            cx, cy = mx - radius * math.cos(phi), my + radius * math.sin(phi)
            span = advance / radius
            theta = phi + span / 2 if convex else phi - span / 2
            glyphs, points = [], []
            for ch in text:
                step = (font.getlength(ch) + 1.0) / radius
                middle = theta - step / 2 if convex else theta + step / 2
                gx, gy = cx + radius * math.cos(middle), cy - radius * math.sin(middle)
                rotation = math.degrees(middle - math.pi / 2) if convex else math.degrees(middle + math.pi / 2)
                if ch.strip():
                    left, top, right, bottom = font.getbbox(ch)
                    mask = Image.new("L", (right - left + 4, bottom - top + 4), 0)
                    ImageDraw.Draw(mask).text((2 - left, 2 - top), ch, font=font, fill=255)
                    glyph = mask.rotate(rotation, expand=True, resample=Image.Resampling.BICUBIC)
                    glyphs.append((glyph, int(gx - glyph.width / 2), int(gy - glyph.height / 2)))
                    points += turned_box(right - left, bottom - top, rotation, gx, gy)
                theta = theta - step if convex else theta + step
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            box = (min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2)
            if not self.free(box):
                continue
            if coast is not None and not self.on_water([(g[1] + g[0].width / 2, g[2] + g[0].height / 2) for g in glyphs]):
                continue
            background = self.under(box).reshape(-1, 3).mean(0)
            if luminance(background) < 150:
                continue
            colour = WATER_INK if coast is not None else DARK_INK[int(self.rng.integers(len(DARK_INK)))]
            for glyph, x, y in glyphs:
                self.paste(glyph, (x, y), colour)
            angle = math.degrees(phi - math.pi / 2 if convex else phi + math.pi / 2)
            angle = round((angle + 180.0) % 360.0 - 180.0, 1)
            label = Label(text, "curved", angle, px, font_name, convex_hull(points))
            self.take(box, label)
            return label
        return None

    def coast_points(self):
        """Points on the coast and the unit normal into the water there (from the blurred mask)."""
        water = self.water.astype(np.uint8) * 255
        soft = np.asarray(Image.fromarray(water).filter(ImageFilter.GaussianBlur(self.size / 60)), np.float32)
        gy, gx = np.gradient(soft)
        edge = np.zeros_like(self.water)
        edge[1:-1, 1:-1] = (self.water[1:-1, 1:-1] != self.water[1:-1, 2:]) | (self.water[1:-1, 1:-1] != self.water[2:, 1:-1])
        ys, xs = np.nonzero(edge)
        norm = np.hypot(gx[ys, xs], gy[ys, xs])
        keep = norm > 1e-3
        ys, xs, norm = ys[keep], xs[keep], norm[keep]
        return ys, xs, gx[ys, xs] / norm, gy[ys, xs] / norm


def letter_sheet(image: Image.Image, rng: np.random.Generator, kind: str, title: str, printed: list[str],
                 water: np.ndarray | None = None) -> list[Label]:
    """Letter ``image`` in place: its title, the ``printed`` names and names of its kind; returns the
    labels as printed (a name that found no room is left out, so the truth is what is on the sheet)."""
    sheet = Sheet(image, rng, water)
    sheet.hatch(int(rng.integers(1, 3)))
    # The title, large and horizontal, in the top or the bottom fifth (smaller until it fits).
    size = sheet.size
    bands = [(0, 0, size, size // 5), (0, size - size // 5, size, size)]
    for px in (30, 26, 22, 19, 16):
        font, _ = sheet.font(px)
        if font.getlength(title) < size * 0.8 and sheet.straight(title, "horizontal", px, within=bands, tries=60):
            break
    pool = [str(n) for n in rng.permutation(KIND_NAMES.get(kind, []))[:6]]
    pool += [str(n) for n in rng.permutation(PLACES)[:7]]
    names = [(name, True) for name in printed] + [(name, False) for name in pool]
    styles, weights = list(STYLES), np.array(list(STYLES.values()))
    for name, _ in names:
        style = str(rng.choice(styles, p=weights / weights.sum()))
        if style == "horizontal":
            water_name = kind == "nautical" and rng.random() < 0.4
            label = sheet.straight(name, style, int(rng.choice([14, 15, 16, 18, 20, 22, 26, 30])), water=water_name)
            if label is None and water_name:
                label = sheet.straight(name, style, int(rng.choice([14, 16, 18])))
        elif style == "small":
            sheet.straight(name, "horizontal", int(rng.integers(11, 14)))
        elif style == "rotated":
            angle = float(rng.uniform(20, 40)) * (1 if rng.random() < 0.5 else -1)
            sheet.straight(name, style, int(rng.integers(16, 25)), round(angle, 1))
        elif style == "vertical":
            sheet.straight(name, style, int(rng.integers(16, 23)), 90.0 if rng.random() < 0.6 else -90.0)
        elif style == "curved":
            sheet.curved(name, int(rng.integers(17, 25)))
        elif style == "faint":
            sheet.straight(name, "horizontal", int(rng.integers(16, 23)), faint=True)
        elif style == "hatched":
            sheet.straight(name, "horizontal", int(rng.integers(16, 23)), hatched=True)
    return sheet.labels


# -- truth ---------------------------------------------------------------------------------------

def truth_rows(file: str, size: tuple[int, int], labels: list[Label]) -> list[dict]:
    """``words.csv`` rows of one sheet: bounds normalised to the image (as ``map_words`` stores
    boxes), the outline in pixels."""
    width, height = size
    rows = []
    for number, label in enumerate(labels, start=1):
        x0, y0, x1, y1 = label.bounds
        rows.append({
            "file": file, "image_width": str(width), "image_height": str(height), "label": str(number),
            "text": label.text, "style": label.style, "angle": f"{label.angle:g}", "px": str(label.px),
            "font": label.font, "faint": str(int(label.faint)), "hatched": str(int(label.hatched)),
            "x": f"{x0 / width:.5f}", "y": f"{y0 / height:.5f}", "w": f"{(x1 - x0) / width:.5f}",
            "h": f"{(y1 - y0) / height:.5f}",
            "outline": json.dumps([[round(x, 1), round(y, 1)] for x, y in label.outline]),
        })
    return rows


def write_truth(folder: Path, rows: list[dict]) -> Path:
    path = Path(folder) / TRUTH_FILE
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_truth(folder: Path) -> dict[str, list[Label]]:
    """file -> its labels, from ``words.csv`` ({} when the folder has none)."""
    path = Path(folder) / TRUTH_FILE
    if not path.is_file():
        return {}
    sheets: dict[str, list[Label]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = Label(row["text"], row["style"], float(row["angle"]), int(row["px"]), row["font"],
                          [tuple(p) for p in json.loads(row["outline"])], faint=row["faint"] == "1",
                          hatched=row["hatched"] == "1")
            sheets.setdefault(row["file"], []).append(label)
    return sheets


# -- scoring -------------------------------------------------------------------------------------

def folded_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", str(text).casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return re.findall(r"[a-z0-9]+", text)


def prints_name(labels: list[Label], name: str) -> bool:
    """Whether a sheet prints ``name``: a label holding its words in order (folded)."""
    wanted = " " + " ".join(folded_words(name)) + " "
    return any(wanted in " " + " ".join(folded_words(label.text)) + " " for label in labels)


@dataclass
class Tally:
    truth_words: int = 0
    found_words: int = 0
    read_words: int = 0
    correct_words: int = 0
    letters_found: int = 0  # truth words inside the joined letters of their label's readings

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def recall(self) -> float | None:
        return self.found_words / self.truth_words if self.truth_words else None

    @property
    def precision(self) -> float | None:
        return self.correct_words / self.read_words if self.read_words else None

    @property
    def letters_recall(self) -> float | None:
        """Recall that forgives a dropped space ("SandyHook" holds "sandy" and "hook")."""
        return self.letters_found / self.truth_words if self.truth_words else None


NO_LABEL = "(no label)"


def score_sheet(labels: list[Label], readings: list[tuple[str, tuple[float, float, float, float]]]) -> dict[str, Tally]:
    """Tallies per label group (and ``NO_LABEL`` for words read where no label is) of one sheet;
    ``readings``: (text, (x0, y0, x1, y1) in sheet pixels) as OCR read them."""
    bounds = []
    for label in labels:
        x0, y0, x1, y1 = label.bounds
        bounds.append((x0 - 4, y0 - 4, x1 + 4, y1 + 4))
    assigned: dict[int, list[str]] = {i: [] for i in range(len(labels))}
    tallies = {group: Tally() for group in [*GROUPS, NO_LABEL]}
    for text, (x0, y0, x1, y1) in readings:
        area = max((x1 - x0) * (y1 - y0), 1.0)
        shares = [max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3]) - max(y0, b[1])) / area
                  for b in bounds]
        best = int(np.argmax(shares)) if shares else -1
        words = folded_words(text)
        if best >= 0 and shares[best] >= 0.3:
            assigned[best].append(text)
            truth = set(folded_words(labels[best].text))
            tally = tallies.setdefault(labels[best].group, Tally())
            tally.read_words += len(words)
            tally.correct_words += sum(1 for w in words if w in truth)
        else:
            tallies[NO_LABEL].read_words += len(words)
    for i, label in enumerate(labels):
        tally = tallies.setdefault(label.group, Tally())  # (the OCR bench's own kinds of label)
        truth = folded_words(label.text)
        read = {w for text in assigned[i] for w in folded_words(text)}
        joined = "".join("".join(folded_words(text)) for text in assigned[i])
        tally.truth_words += len(truth)
        tally.found_words += sum(1 for w in truth if w in read)
        tally.letters_found += sum(1 for w in truth if w in joined)
    return tallies


def summarise(tallies: dict[str, Tally]) -> dict:
    """Recall and precision per group, overall, horizontal >= 14 px, and rotated or curved."""
    def pooled(groups):
        total = Tally()
        for group in groups:
            total.add(tallies[group])
        return total

    def figures(tally: Tally) -> dict:
        return {"truth_words": tally.truth_words, "found_words": tally.found_words, "read_words": tally.read_words,
                "correct_words": tally.correct_words, "letters_found": tally.letters_found, "recall": tally.recall,
                "precision": tally.precision, "letters_recall": tally.letters_recall}

    return {"groups": {group: figures(tallies[group]) for group in [*GROUPS, NO_LABEL]},
            "all": figures(pooled([*GROUPS, NO_LABEL])),
            "horizontal_14": figures(pooled(HORIZONTAL_14)),
            "rotated_curved": figures(pooled(ROTATED))}
