"""Reading the words printed on a map: RapidOCR (PP-OCRv6 small detection and recognition and the
PP-OCR orientation ONNX models, shipped inside the ``rapidocr`` wheel, run by ONNX Runtime) over
overlapping tiles.

    map row -> image at a size fit for lettering -> tiles (overlapping, each under a pixel cap)
      -> per tile: detect text boxes (any angle; the detector sees the tile ``detect_scale`` times
         larger, ``OcrSettings``), crop each box upright, fix upside-down crops
         (the orientation model), recognise -> boxes back in the full image, duplicates merged
      -> ``MapWord`` rows (``datasette_mapclip/store/words.py``)

Which pixels are read (``ImageSource``): a local file at full resolution; a IIIF image (loc.gov)
as the IIIF derivative that fits ``ocr_size`` x ``ocr_size`` (default 2,048 px); any other URL as
it is served.  Kept files are read instead of the network when they are large enough: the OCR-size
derivative an earlier ``mapclip ocr --keep-images DIR`` wrote, or the file a load kept (when the
load kept a derivative at least that large).

Tiles: a tile is at most ``tile`` px on a side and neighbours overlap by ``overlap`` px, so a word
up to ``overlap`` px long that a tile edge cuts lies whole inside the neighbouring tile.  The detector
sees each tile ``detect_scale`` times larger, and its memory grows with what it sees (a 2,048 px tile
at 1.5 is 3,072 px: 1.2 GiB or more), so tiles are also at most ``detect_max_side / detect_scale`` px of the
image (2,048 px at the default 1.0, 1,365 px at 1.5: ``OcrSettings.source_tiles``) and no side the detector gets is over
``detect_max_side`` (``OcrEngine.detector_input``).  A reading
that touches a tile's inner edge is kept only when no whole reading overlaps it; two readings of the
same text (a word inside an overlap, or read in both the upright and the turned pass) are merged,
the more confident one kept.

Angles: the detector finds boxes at any angle; each box is cropped upright along its long side, so
labels at 30 or -35 degrees and vertical ones are read as horizontal lines; the orientation model
turns upside-down crops.  ``rotations=(0, 90)`` also reads every tile turned by 90 degrees and keeps
the best reading of each place (twice the time; measured in bench/results/ocr.md).

Spaces: the recogniser's output is decoded here (``OcrEngine.recognise_lines``, ``ocr_spacing``), so a
space between two words that the recogniser all but read ("SandyHook") is put back.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datasette_mapclip.model import iiif
from datasette_mapclip.model.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from datasette_mapclip.store.words import MapToRead, MapWord

from .fetch import Fetcher, FetchError
from .kept_images import KeepImages, read_kept
from .ocr_spacing import SPACING_METHOD, decode_with_spaces

ENGINE = "rapidocr"
INSTALL_HINT = "pip install 'rapidocr>=3.10,<3.11' (or: pip install 'datasette-mapclip[load]')"
DEFAULT_OCR_SIZE = 2048
# px on a side: a 2,048 px derivative is read as one tile (4.2 Mpx at most) where the detector sees it at
# its own size (detect_scale 1.0, the default); at 1.5, in tiles of at most 1,365 px (``OcrSettings.source_tiles``)
DEFAULT_TILE = 2048
DEFAULT_OVERLAP = 256
DEFAULT_MIN_CONFIDENCE = 0.5
# A tile's shape as the detector gets it: its shorter side is scaled up to 736 px (RapidOCR's
# default), so a thin strip would become a huge input; strips are padded to at most this ratio.
MAX_TILE_ASPECT = 4.0
MIN_TILE_SIDE = 32
# The longest side of what the detector is given (a tile scaled by ``detect_scale``, then by RapidOCR's
# preprocessing): its peak memory follows it.  Measured on a drawn 2,048 x 1,536 sheet (bench/ocr_bench.py's
# draw_sheet(1000), 2 threads, max RSS of the process, PP-OCRv6): at detect_scale 1.0 one tile seen at its own
# size, 0.92 GiB; at 1.5 four tiles of 1,153 x 897 px seen at 1,728 x 1,344, 0.76 GiB (seen whole at 1.5,
# 3,072 x 2,304 px, PP-OCRv4's detector took 1.20-1.26 GiB).
DEFAULT_DETECT_MAX_SIDE = 2048
EDGE_MARGIN = 3  # px: a box this close to a tile's inner edge may be cut by it
SAME_PLACE = 0.5  # two readings whose boxes share this much of the smaller one are one word


# RapidOCR's steps -> the model files its 3.10 wheel carries (its defaults: PP-OCRv6 small, PP-OCR mobile v2.0)
MODEL_FILES = {"Det": "PP-OCRv6_det_small.onnx", "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
               "Rec": "PP-OCRv6_rec_small.onnx"}


def model_folder(module) -> Path:
    """Where the installed RapidOCR keeps its models."""
    return Path(module.__file__).resolve().parent / "models"


class OcrUnavailable(RuntimeError):
    """The OCR engine is not installed, or its models do not load; the message says what to do."""


def import_rapidocr():
    try:
        import onnxruntime  # noqa: F401  (RapidOCR runs its models with it, and says so only when first used)
        import rapidocr
    except ImportError as error:
        raise OcrUnavailable(f"reading words needs the OCR engine ({error.name or 'rapidocr'} "
                             f"is not installed): {INSTALL_HINT}") from None
    return rapidocr


@dataclass(frozen=True)
class OcrSettings:
    """What changes a reading (recorded in ``ocr_models.settings``), and the threads it may use."""

    ocr_size: int = DEFAULT_OCR_SIZE  # IIIF derivatives: the long side asked for
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    rotations: tuple[int, ...] = (0,)
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    respace: bool = True  # put back a space the recogniser all but read between two words (``ocr_spacing``)
    # IIIF sheets larger than ocr_size read at full resolution, as region tiles (``RegionTiles``)
    full_resolution: bool = False
    # The detector (``OcrEngine.detect``) and its boxes.  ``detect_scale``: how much larger the detector sees a
    # tile.  PP-OCRv4's detector missed or cut short many names of 14-22 px at the tile's own scale and needed
    # 1.5; PP-OCRv6's does not.  Word recall / precision of horizontal labels of 14 px and over at 1.0 and at
    # 1.5 (bench/results/ocr-demo.md, bench/results/ocr.md): on the demo's lettered sheets 0.927 / 0.952 and
    # 0.929 / 0.952, on a second draw of them 0.939 / 0.955 and 0.951 / 0.962, on the plain drawn sheets
    # 0.92 / 0.95 and 0.92 / 0.94, for 2.21 s a 2,048 x 1,536 sheet against 4.92 (1.25: 2.99 s, no better).
    # At 1.0 a 2,048 px image is one tile.
    detect_scale: float = 1.0
    # How far a detected box is grown before its crop is read: RapidOCR's 1.6 clips first or last letters
    # ("ape Fear"); 1.75 reads the above (at 1.0) against 0.929 / 0.954, 0.930 / 0.950 and 0.91 / 0.93 at 1.6.
    unclip_ratio: float = 1.75
    # Boxes the detector is less sure of (mean text probability from ``weak_box_thresh`` up to RapidOCR's 0.5)
    # read too, kept only when read with ``weak_box_confidence`` or more.  With PP-OCRv4's detector 0.3 found
    # 5 more of 172 rotated or curved words on the demo; with PP-OCRv6's (at 1.5) it found none and cost
    # precision (0.948 -> 0.952 and 0.958 -> 0.962 without), so it is off (None: RapidOCR's 0.5 alone).
    weak_box_thresh: float | None = None
    weak_box_confidence: float = 0.9
    # No side of the detector's input is over this many px: tiles are cut at most this / detect_scale px
    # (``source_tiles``), and a thin tile that RapidOCR's preprocessing would stretch further is scaled to it.
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE
    # The orientation model (PP-OCR's mobile v2.0 classifier) now and then turns an upright crop upside down
    # (a faint "Goldsboro" over hatching read "oJoqsploo"): a crop it turns is also read as cut, and the more
    # confident of the two readings is kept (one more line read for each crop turned; few are).  On the demo's
    # two draws: horizontal 0.912 / 0.934 -> 0.927 / 0.952 and 0.926 / 0.938 -> 0.939 / 0.955, rotated or
    # curved 0.837 -> 0.872 and 0.819 -> 0.865 (bench/results/ocr-demo.md).
    check_turned: bool = True
    threads: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.tile < 2 * MIN_TILE_SIDE or not 0 <= self.overlap < self.tile // 2:
            raise ValueError(f"tiles of {self.tile} px need an overlap from 0 to {self.tile // 2 - 1} px, "
                             f"not {self.overlap}")
        if any(r not in (0, 90) for r in self.rotations) or 0 not in self.rotations:
            raise ValueError(f"rotations are 0 or 0 and 90, not {self.rotations}")
        if not 0.25 <= self.detect_scale <= 4:
            raise ValueError(f"detect_scale is from 0.25 to 4, not {self.detect_scale}")
        if self.detect_max_side < 256 or self.detect_max_side % 32:
            raise ValueError(f"detect_max_side is a multiple of 32 px from 256, not {self.detect_max_side}")

    @property
    def source_tiles(self) -> tuple[int, int]:
        """(tile, overlap) of the tiles cut from an image: at most ``tile`` px and at most
        ``detect_max_side / detect_scale`` px (the detector sees them ``detect_scale`` times larger),
        the overlap kept under half a tile."""
        tile = min(self.tile, max(2 * MIN_TILE_SIDE, math.floor(self.detect_max_side / self.detect_scale)))
        return tile, min(self.overlap, tile // 2 - 1)

    def recorded(self) -> dict:
        settings = asdict(self)
        settings.pop("threads")
        if not self.full_resolution:
            settings.pop("full_resolution")  # as recorded before the option existed: no re-read
        settings["rotations"] = list(self.rotations)
        if self.respace:  # how spaces are put back changed what is read: record the method, not just "on"
            settings["respace"] = SPACING_METHOD
        return settings


# -- tiles ---------------------------------------------------------------------------------------

def tile_starts(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, size) of tiles covering ``length`` px, each at most ``tile`` px, neighbours
    overlapping by at least ``overlap`` px, all of one size (as small as that allows)."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    # one px of slack absorbs the rounding of the starts below
    size = min(tile, math.ceil((length + (count - 1) * overlap) / count) + 1)
    step = (length - size) / (count - 1)
    return [(round(i * step), size) for i in range(count)]


@dataclass
class Tile:
    x: int
    y: int
    width: int
    height: int
    inner: tuple[bool, bool, bool, bool]  # left, top, right, bottom edges lie inside the image


def tiles_of(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    columns, rows = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    return [Tile(x, y, w, h, (x > 0, y > 0, x + w < width, y + h < height))
            for y, h in rows for x, w in columns]


@dataclass
class RegionTiles:
    """A IIIF sheet read at full resolution: its size, its tiles, and ``pixels(tile)`` fetching one
    tile as a IIIF region (RGB array) while it is read, so a sheet of any size is never decoded whole."""

    size: tuple[int, int]
    tiles: list[Tile]
    pixels: Callable[[Tile], np.ndarray]


# -- one reading ---------------------------------------------------------------------------------

@dataclass
class Reading:
    """Text read in one place: its quadrilateral in full-image pixels (tl, tr, br, bl as
    detected), reading angle, and whether a tile edge may have cut it."""

    text: str
    confidence: float
    quad: np.ndarray  # (4, 2) float
    angle: float
    cut: bool = False

    @functools.cached_property
    def bounds(self) -> tuple[float, float, float, float]:
        xs, ys = self.quad[:, 0], self.quad[:, 1]
        return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())

    @functools.cached_property
    def polygon(self):
        from shapely.geometry import Polygon

        polygon = Polygon(self.quad)
        return polygon if polygon.is_valid else polygon.convex_hull


def reading_angle(quad: np.ndarray, turned: bool, flipped: bool) -> float:
    """Degrees counter-clockwise from left-to-right horizontal (image y grows downwards).

    The crop of a box runs along tl->tr; RapidOCR turns a crop whose height is 1.5 times its width
    or more by 90 degrees counter-clockwise, so it is read along tl->bl; the orientation model
    turns an upside-down crop by 180."""
    start, end = quad[0], quad[3] if turned else quad[1]
    angle = math.degrees(math.atan2(-(end[1] - start[1]), end[0] - start[0]))
    if flipped:
        angle += 180.0
    angle = (angle + 180.0) % 360.0 - 180.0
    return 180.0 if angle == -180.0 else round(angle, 1)


def overlap_share(a: Reading, b: Reading) -> float:
    """How much of the smaller of two readings' boxes the other covers (0..1)."""
    ax0, ay0, ax1, ay1 = a.bounds
    bx0, by0, bx1, by1 = b.bounds
    if ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0:
        return 0.0
    smaller = min(a.polygon.area, b.polygon.area)
    if smaller <= 0:
        return 0.0
    return float(a.polygon.intersection(b.polygon).area / smaller)


def merge_readings(readings: list[Reading]) -> list[Reading]:
    """One reading per place: whole readings before ones a tile edge may have cut, then the more
    confident; a reading that shares ``SAME_PLACE`` of its box with one kept is dropped."""
    kept: list[Reading] = []
    for reading in sorted(readings, key=lambda r: (r.cut, -r.confidence, -len(r.text))):
        if all(overlap_share(reading, other) < SAME_PLACE for other in kept):
            kept.append(reading)
    return kept


def has_text(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


# -- the engine ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OcrEngine:
    """RapidOCR with the settings above: ``read(image)`` -> the words on it, normalised."""

    def __init__(self, settings: OcrSettings | None = None):
        self.settings = settings or OcrSettings()
        module = import_rapidocr()
        # The three models RapidOCR 3.10's wheel carries, named so that RapidOCR opens these files and never
        # tries to download one (it does, for a missing or damaged file it was left to find itself)
        self.model_dir = model_folder(module)
        self.model_files = {step: self.model_dir / name for step, name in MODEL_FILES.items()}
        missing = [str(path) for path in self.model_files.values() if not path.is_file()]
        if missing:
            raise OcrUnavailable(f"the OCR models are not installed ({', '.join(missing)}): {INSTALL_HINT}")
        params = {"Global.log_level": "critical", **{f"{step}.model_path": str(path)
                                                     for step, path in self.model_files.items()}}
        if self.settings.threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(self.settings.threads)
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        try:
            ocr = module.RapidOCR(params=params)
            # the three steps, loaded now (RapidOCR loads them at its first call; this reader calls them itself)
            self.detector, self.classifier, self.recogniser = (
                ocr._load_det_model(), ocr._load_cls_model(), ocr._load_rec_model())
        except Exception as error:  # a damaged file, a model ONNX Runtime cannot load
            reason = str(error).strip().splitlines()[-1][:300] if str(error).strip() else ""
            raise OcrUnavailable(f"the OCR models did not load ({type(error).__name__}: {reason}); "
                                 f"reinstall them: {INSTALL_HINT}") from None

    def provenance(self) -> dict:
        """What an ``ocr_models`` row records: engine, version, model files by SHA-256, settings."""
        try:
            version = importlib.metadata.version(ENGINE)
        except importlib.metadata.PackageNotFoundError:
            version = None
        weights = {path.name: _file_sha256(str(path)) for path in sorted(self.model_files.values())}
        return {"engine": ENGINE, "engine_version": version, "weights": weights,
                "settings": self.settings.recorded()}

    # -- reading ---------------------------------------------------------------------------------
    def read(self, image) -> list[MapWord]:
        """The words on an RGB Pillow image (or a ``RegionTiles`` sheet), boxes normalised to it (0..1)."""
        width, height = image.size
        if isinstance(image, RegionTiles):
            readings = self.read_tiles((tile, image.pixels(tile)) for tile in image.tiles)
        else:
            readings = self.read_pixels(np.asarray(image if image.mode == "RGB" else image.convert("RGB")))
        return [to_map_word(reading, width, height) for reading in readings]

    def read_pixels(self, rgb: np.ndarray) -> list[Reading]:
        """Readings of an RGB array (height, width, 3) in its pixel coordinates, merged over tiles
        and rotations."""
        height, width = rgb.shape[:2]
        tiles = tiles_of(width, height, *self.settings.source_tiles)
        return self.read_tiles((tile, rgb[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width]) for tile in tiles)

    def read_tiles(self, tiles) -> list[Reading]:
        """Readings of (tile, its RGB pixels) pairs, in the whole image's pixel coordinates, merged."""
        readings = []
        for tile, rgb in tiles:
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            for rotation in self.settings.rotations:
                for reading in self.read_tile(bgr, rotation):
                    reading.cut = touches_inner_edge(reading.quad, tile)
                    reading.quad = reading.quad + (tile.x, tile.y)
                    readings.append(reading)
        return merge_readings(readings)

    def read_tile(self, bgr: np.ndarray, rotation: int = 0) -> list[Reading]:
        """Readings of one tile (BGR, as RapidOCR takes arrays), in the tile's coordinates;
        ``rotation`` 90: read the tile turned 90 degrees counter-clockwise, boxes turned back."""
        height, width = bgr.shape[:2]
        pixels = np.ascontiguousarray(np.rot90(bgr)) if rotation == 90 else bgr
        readings = []
        for text, confidence, quad, angle in self.recognise(padded(pixels)):
            if rotation == 90:
                # turned[i, j] = tile[j, width - 1 - i]: a point (x, y) read there is (width - 1 - y, x) here
                quad = np.stack([width - 1 - quad[:, 1], quad[:, 0]], axis=1)
                angle = (angle - 90.0 + 180.0) % 360.0 - 180.0
            quad[:, 0] = np.clip(quad[:, 0], 0, width)
            quad[:, 1] = np.clip(quad[:, 1], 0, height)
            readings.append(Reading(text, confidence, quad, angle))
        return readings

    def recognise(self, bgr: np.ndarray) -> Iterator[tuple[str, float, np.ndarray, float]]:
        """RapidOCR's detection, orientation and recognition steps on one image (its own ``__call__``
        minus the resizing, which the tiles replace, plus each crop's orientation, which gives the angle)."""
        from rapidocr.utils.process_img import get_rotate_crop_image

        boxes, scores = self.detect(bgr)
        if not boxes:
            return
        cut = [get_rotate_crop_image(bgr, box.copy()) for box in boxes]
        upright = self.classifier(cut)  # (it turns copies: ``cut`` stays as cut)
        cls_thresh = self.classifier.cls_thresh
        flips = ["180" in str(label) and float(label_score) > cls_thresh for label, label_score in upright.cls_res]
        checked = [i for i, flipped in enumerate(flips) if flipped] if self.settings.check_turned else []
        lines = self.recognise_lines(list(upright.img_list) + [cut[i] for i in checked])
        recognised = lines[:len(boxes)]
        for i, as_cut in zip(checked, lines[len(boxes):]):
            if as_cut[1] > recognised[i][1]:
                recognised[i], flips[i] = as_cut, False
        strong = self.detector.postprocess_op.box_thresh
        for box, score, flipped, (text, confidence) in zip(boxes, scores, flips, recognised):
            text = " ".join(text.split())
            if confidence < self.settings.min_confidence or not has_text(text):
                continue
            if score < strong and confidence < self.settings.weak_box_confidence:
                continue  # a weak box read without conviction: most are hatching, rivers, noise
            quad = np.asarray(box, dtype=np.float64).reshape(4, 2)
            crop_width = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
            crop_height = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
            turned = crop_width > 0 and crop_height / crop_width >= 1.5
            yield text, confidence, quad, reading_angle(quad, turned, flipped)

    def detect(self, bgr: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        """Text boxes of one image ((4, 2) float32, tl tr br bl, in its pixels) and their detector scores:
        RapidOCR's detector run on the image scaled by ``detect_scale``, its boxes grown by
        ``unclip_ratio`` and kept from ``weak_box_thresh`` (``OcrSettings``), sorted top to bottom."""
        from rapidocr.ch_ppocr_det.utils import DBPostProcess

        det = self.detector
        height, width = bgr.shape[:2]
        tensor = self.detector_input(bgr)
        if tensor is None:
            return [], []
        strong = det.postprocess_op
        weak = self.settings.weak_box_thresh
        post = DBPostProcess(thresh=strong.thresh, box_thresh=min(strong.box_thresh, weak if weak is not None else 1.0),
                             max_candidates=strong.max_candidates, unclip_ratio=self.settings.unclip_ratio,
                             score_mode=strong.score_mode, use_dilation=strong.dilation_kernel is not None)
        # boxes come back in the unscaled image's pixels (the post-processing maps the map to ``width, height``),
        # corners ordered tl tr br bl, clipped to the image, those of 3 px or less on a side dropped
        found, scores = post(det.session(tensor), (height, width))
        kept = [(np.asarray(box, dtype=np.float32), float(score)) for box, score in zip(found, scores)]
        kept.sort(key=lambda item: (float(item[0][0][1]), float(item[0][0][0])))
        return [box for box, _ in kept], [score for _, score in kept]

    def detector_input(self, bgr: np.ndarray) -> np.ndarray | None:
        """The detector's input tensor (1, 3, h, w) for one image: the image scaled by ``detect_scale``,
        then RapidOCR's preprocessing (the shorter side up to 736 px, sides rounded to multiples of 32);
        where that would make a side over ``detect_max_side`` (a thin tile), the image scaled so that its
        longer side is ``detect_max_side`` instead."""
        from rapidocr.ch_ppocr_det.utils import DetPreProcess

        det = self.detector
        cv2 = cv2_module()
        height, width = bgr.shape[:2]
        scale = self.settings.detect_scale
        pixels = bgr
        if scale != 1.0:
            size = (max(32, round(width * scale)), max(32, round(height * scale)))
            pixels = cv2.resize(bgr, size, interpolation=cv2.INTER_CUBIC)
        tensor = det.get_preprocess()(pixels)
        limit = self.settings.detect_max_side
        if tensor is None or max(tensor.shape[2:]) <= limit:
            return tensor
        scale = limit / max(width, height)
        size = (max(32, min(limit, math.floor(width * scale))), max(32, min(limit, math.floor(height * scale))))
        pixels = cv2.resize(bgr, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
        # sides at most ``limit`` (a multiple of 32): only rounded to multiples of 32, never over it
        return DetPreProcess(limit, "max", det.mean, det.std)(pixels)

    def recognise_lines(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """(text, confidence) of each upright line crop: RapidOCR's recogniser run as it
        runs itself (crops sorted by shape, batches padded to the widest), decoded here so
        that each character's place along the line is known and a space the recogniser all but
        read is put back (``ocr_spacing``, ``OcrSettings.respace``)."""
        rec = self.recogniser
        decoder = rec.postprocess_op
        characters = decoder.character
        space = len(characters) - 1 if characters and characters[-1] == " " else None
        _, height, width = rec.rec_image_shape[:3]
        order = np.argsort([crop.shape[1] / float(crop.shape[0]) for crop in crops])
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for start in range(0, len(crops), rec.rec_batch_num):
            batch = order[start:start + rec.rec_batch_num]
            widest = max([width / height] + [crops[i].shape[1] / float(crops[i].shape[0]) for i in batch])
            pixels = np.stack([rec.resize_norm_img(crops[i], widest) for i in batch]).astype(np.float32)
            probabilities = rec.session(pixels)
            for i, line in zip(batch, probabilities):
                results[i] = decode_with_spaces(line, characters, space, self.settings.respace)
        return results


def cv2_module():
    import cv2  # OpenCV comes with rapidocr

    return cv2


def padded(bgr: np.ndarray) -> np.ndarray:
    """A tile grown (right and bottom only: coordinates stay) to at least ``MIN_TILE_SIDE`` px and at
    most ``MAX_TILE_ASPECT`` long to short, with its median colour."""
    height, width = bgr.shape[:2]
    target_w = max(width, MIN_TILE_SIDE, math.ceil(height / MAX_TILE_ASPECT))
    target_h = max(height, MIN_TILE_SIDE, math.ceil(width / MAX_TILE_ASPECT))
    if (target_w, target_h) == (width, height):
        return bgr
    out = np.empty((target_h, target_w, 3), dtype=bgr.dtype)
    out[:] = np.median(bgr.reshape(-1, 3), axis=0).astype(bgr.dtype)
    out[:height, :width] = bgr
    return out


def touches_inner_edge(quad: np.ndarray, tile: Tile) -> bool:
    """Whether a box (tile coordinates) reaches an edge of the tile that lies inside the image."""
    left, top, right, bottom = tile.inner
    xs, ys = quad[:, 0], quad[:, 1]
    return bool((left and xs.min() <= EDGE_MARGIN) or (top and ys.min() <= EDGE_MARGIN)
                or (right and xs.max() >= tile.width - 1 - EDGE_MARGIN)
                or (bottom and ys.max() >= tile.height - 1 - EDGE_MARGIN))


def to_map_word(reading: Reading, width: int, height: int) -> MapWord:
    x0, y0, x1, y1 = reading.bounds
    x0, x1 = max(0.0, x0) / width, min(float(width), x1) / width
    y0, y1 = max(0.0, y0) / height, min(float(height), y1) / height
    return MapWord(reading.text, round(reading.confidence, 4), round(x0, 5), round(y0, 5),
                   round(x1 - x0, 5), round(y1 - y0, 5), reading.angle)


# -- the pixels to read --------------------------------------------------------------------------

def ocr_url(location: str, ocr_size: int) -> str:
    """Where a map's lettering is read from: a IIIF image as its derivative fitting ``ocr_size``;
    anything else (a local file, a plain URL) as it is."""
    return iiif.sized(location, ocr_size) if iiif.is_iiif_image(location) else location


def is_remote(location: str | None) -> bool:
    return bool(location) and location.startswith(("http://", "https://"))


class ReadError(Exception):
    """A map whose image could not be got or decoded for OCR; the message is its load_errors reason."""


@dataclass
class Fetched:
    image: object  # PIL.Image, RGB
    from_kept: bool = False
    keep: tuple[bytes, str] | None = None  # what to write to the keep folder (downloaded bytes)


class ImageSource:
    """Gets the image of a map at a size fit for lettering (thread-safe: fetch workers share it)."""

    def __init__(self, fetcher: Fetcher, *, ocr_size: int = DEFAULT_OCR_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 keep: KeepImages | None = None, regions: OcrSettings | None = None):
        """``regions``: settings with ``full_resolution`` on (their tile and overlap): IIIF sheets
        larger than ``ocr_size`` are read as full-resolution region tiles."""
        self.fetcher = fetcher
        self.ocr_size = int(ocr_size)
        self.max_pixels = max_pixels
        self.keep = keep
        self.regions = regions if regions is not None and regions.full_resolution else None

    def kept_path(self, source_id: str) -> str | None:
        """Where ``--keep-images`` keeps this map's OCR-size image (it may not exist yet)."""
        if not self.keep:
            return None
        return str(Path(self.keep.root) / self.keep.relative_path(source_id, ".jpg"))

    def get(self, target: MapToRead, load_kept_path: str | None = None) -> Fetched:
        """The map's image (``ReadError`` if it cannot be had); ``load_kept_path``: the file a load
        kept for it (``MapStore.kept_image_path``), read if it is large enough."""
        location = target.location
        if not location:
            raise ReadError("no location recorded for this map (where its pixels are)")
        if self.regions is not None and iiif.is_iiif_image(location):
            sheet = self.region_tiles(iiif.service_url(location))
            if sheet is not None:
                return Fetched(sheet)
        if is_remote(location):
            # this command's own kept derivative of this size; else a load's, when it is as large
            for path, check in ((self.kept_path(target.source_id), False), (load_kept_path, True)):
                data = read_kept(path)
                if data is not None and (not check or self.large_enough(data)):
                    try:
                        return Fetched(self.decode(data), from_kept=True)
                    except ReadError:
                        pass  # a damaged kept file: fetch the image again
        try:
            data = self.fetcher.get_bytes(ocr_url(location, self.ocr_size))
        except FetchError as error:
            raise ReadError(f"fetch: {error}") from None
        image = self.decode(data)
        keep = (data, ".jpg") if self.keep and is_remote(location) else None
        return Fetched(image, keep=keep)

    def region_tiles(self, service: str) -> RegionTiles | None:
        """The sheet as full-resolution region tiles (its size from the service's info.json), or None
        when it is no larger than ``ocr_size`` (one derivative holds all of it)."""
        try:
            info = json.loads(self.fetcher.get_bytes(f"{service}/info.json"))
            width, height = int(info["width"]), int(info["height"])
        except FetchError as error:
            raise ReadError(f"fetch: {error}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ReadError(f"the image service's info.json cannot be read: {type(error).__name__}: {error}") from None
        if width <= 0 or height <= 0:
            raise ReadError(f"the image service says the image is {width} x {height} px")
        if max(width, height) <= self.ocr_size:
            return None
        if width * height > self.max_pixels:
            raise ReadError(f"{width} x {height} px is more than the {self.max_pixels:,} pixels a map may have "
                            "(--max-pixels); read it without --full-resolution")
        # IIIF Image API 3 names the full size "max"; 2 names it "full"
        full = "max" if "/3/" in str(info.get("@context", "")) else "full"
        tiles = tiles_of(width, height, *self.regions.source_tiles)

        def pixels(tile: Tile) -> np.ndarray:
            url = f"{service}/{tile.x},{tile.y},{tile.width},{tile.height}/{full}/0/default.jpg"
            try:
                image = self.decode(self.fetcher.get_bytes(url))
            except FetchError as error:
                raise ReadError(f"fetch of a tile: {error}") from None
            if image.size != (tile.width, tile.height):  # a server that scaled the region: back to its pixels
                image = image.resize((tile.width, tile.height))
            return np.asarray(image.convert("RGB"))

        return RegionTiles((width, height), tiles, pixels)

    def large_enough(self, data: bytes) -> bool:
        """Whether a file a load kept is at least ``ocr_size`` on its long side (a load's 512 px
        derivative is not; the map's recorded size is the derivative's for IIIF loads, so it says
        nothing about the sheet)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as header:
                return max(header.size) >= self.ocr_size
        except Exception:
            return False

    def decode(self, data: bytes):
        try:
            return open_image(data, max_pixels=self.max_pixels)
        except ImageDecodeError as error:
            raise ReadError(f"decode: {error}") from None


def keep_ocr_images(root: str, ocr_size: int) -> KeepImages:
    """The keep folder's part for OCR-size images: ``DIR/ocr-<size>/``, apart from the model-sized
    images a load keeps, which re-embedding must find unchanged."""
    return KeepImages(Path(root) / f"ocr-{int(ocr_size)}", size=ocr_size)


def write_kept(keep: KeepImages, source_id: str, payload: tuple[bytes, str]):
    """Write a downloaded OCR-size image where ``ImageSource.kept_path`` looks (always ``.jpg``:
    IIIF derivatives are JPEGs; the name says where, the decoder reads the real format)."""
    data, _ = payload
    return keep.write(source_id, (data, ".jpg"))


def timed_read(engine: OcrEngine, image) -> tuple[list[MapWord], float]:
    started = time.perf_counter()
    words = engine.read(image)
    return words, time.perf_counter() - started
