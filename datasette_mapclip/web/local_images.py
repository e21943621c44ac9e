"""A map's own local image (a folder load: no IIIF service) for the map page's deep-zoom viewer.

The image is addressed by map id only: the file is the one the collection's own ``maps.location``
names (``store.local_file``), never a path from the request.  It is re-encoded as a JPEG whose
long side is at most ``max_image_side``, in the plugin's decode thread (one image at a time, so
one decode's memory is the most this takes), within Pillow's decompression-bomb limit, and kept
in a small in-memory cache keyed by the file's size and modification time."""

from __future__ import annotations

import asyncio
import collections
import io
import math
import threading
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from .. import store
from ..model.images import DEFAULT_MAX_PIXELS, to_rgb
from ..search.errors import NotFound
from ..settings import settings_of

MIB = 1024 * 1024
MAX_FILE_BYTES = 1024 * MIB  # a larger file is not read for the viewer (its thumbnail is shown)
CACHE_BYTES = 96 * MIB       # encoded images kept per server
JPEG_QUALITY = 85
ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)        # EXIF orientations that swap width and height


class LocalImageCache:
    """Encoded images, least recently used dropped past a byte budget; safe across threads."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget = budget
        self._items: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes):
        if len(data) > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old else 0
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.budget:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class Unreadable(Exception):
    """The file is missing, too large, or not a picture Pillow may open."""


def _pixel_limit() -> int:
    # Pillow refuses twice its own limit outright; the loaders' cap is the same figure by default.
    pillow = Image.MAX_IMAGE_PIXELS
    return min(DEFAULT_MAX_PIXELS, 2 * pillow) if pillow else DEFAULT_MAX_PIXELS


def _opened(path: Path) -> Image.Image:
    """The file opened lazily (header only), its size checked before any pixel is decoded."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            raise Unreadable("missing or too large")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            image = Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise Unreadable(str(error)) from None
    width, height = image.size
    if not width or not height or width * height > _pixel_limit():
        image.close()
        raise Unreadable(f"{width}x{height} is beyond the pixel limit")
    return image


def true_size(path: Path) -> tuple[int, int]:
    """The map's size as its file holds it, turned as its EXIF says (no pixel decoded)."""
    image = _opened(path)
    try:
        width, height = image.size
        try:
            turned = image.getexif().get(ORIENTATION) in TURNED
        except Exception:  # an unreadable EXIF block: the size as stored
            turned = False
        return (height, width) if turned else (width, height)
    finally:
        image.close()


def encode(path: Path, long_side: int) -> bytes:
    """The file as a JPEG with its long side at most ``long_side``, turned as its EXIF says."""
    image = _opened(path)
    try:
        width, height = image.size
        scale = min(1.0, long_side / max(width, height))
        if image.format == "JPEG" and scale < 1:
            # decode at the smallest DCT scale still at least the wanted size (much less memory)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        image.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise Unreadable(str(error)) from None
    finally:
        image.close()


def _cache_key(path: Path, long_side: int) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size, long_side)


def _cached_encode(cache: LocalImageCache, path: Path, long_side: int) -> bytes:
    try:
        key = _cache_key(path, long_side)
    except (OSError, ValueError):  # missing; or a name no file can have (a NUL byte)
        raise Unreadable("missing") from None
    data = cache.get(key)
    if data is None:
        data = encode(path, long_side)
        cache.put(key, data)
    return data


async def map_file(db, map_id: int) -> Path | None:
    """The local file a map's row names (None for a remote or missing location)."""
    location = await db.execute_fn(lambda conn: store.read_map_location(conn, map_id))
    return store.local_file(location, db.path)


async def _in_decode_thread(state, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(state.workers.decode, fn, *args)


async def viewer_source(state, db, map_id: int) -> dict | None:
    """``{"width", "height"}`` of a map's local image where the viewer can show it (a readable
    picture within the limits), else None.  The caller checks permissions."""
    path = await map_file(db, map_id)
    if path is None:
        return None
    try:
        width, height = await _in_decode_thread(state, true_size, path)
    except Unreadable:
        return None
    return {"width": width, "height": height}


async def image_bytes(state, db, map_id: int, config) -> bytes:
    """The re-encoded JPEG of a map's local image; NotFound where there is none to show.  The
    caller checks permissions."""
    path = await map_file(db, map_id)
    if path is None:
        raise NotFound("no local image for that map")
    try:
        return await _in_decode_thread(state, _cached_encode, state.local_images, path,
                                       settings_of(config).max_image_side)
    except Unreadable:
        raise NotFound("the image of that map cannot be read") from None
