"""Decode image bytes safely into RGB: draft-mode JPEG decoding, a pixel cap, EXIF rotation.

Used by the loaders (every fetched image) and the plugin (uploads), so both refuse the
same bad inputs with the same readable reasons.  ``open_query_image`` is the bounded variant for
images a search is given (uploads, SQL arguments): a cap on decoded bytes, and the image reduced
to about the model's size as soon as it is decoded.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..settings import DECLARED

# Pillow's own error threshold (2 x its warning limit); LoC master TIFFs reach ~100 Mpx.
# open_image enforces its ``max_pixels`` itself, from the header, before any pixel is decoded;
# Pillow's global limit stays as the process's owner set it (runtime.limit_image_pixels).
DEFAULT_MAX_PIXELS = 178_956_970
# What decoding one query image may take (open_query_image): 64 MiB holds a 16 Mpx RGB(A) PNG or TIFF
# (Pillow keeps RGB in 4 bytes a pixel); JPEGs are decoded in draft mode, at 1/8 scale for big ones.
DEFAULT_MAX_QUERY_DECODED_BYTES = DECLARED["max_upload_decoded_bytes"].default


class ImageDecodeError(ValueError):
    """An input that is not a usable image; the message says why, for a person."""


# (leading bytes, lower-cased; what a person is told).  Reasons end up in load_errors, which is
# published with the collection: they name the kind of file, never quote its bytes.
_KNOWN_KINDS = (
    ((b"<!doctype html", b"<html"), "the server sent an HTML page"),
    ((b"{", b"["), "got JSON"),
    ((b"%pdf",), "got a PDF"),
    ((b"pk\x03\x04", b"pk\x05\x06"), "looks like a ZIP archive (or an Office document)"),
    ((b"\x1f\x8b",), "looks like a gzip file"),
    ((b"<?xml", b"<svg"), "looks like XML or SVG (vector drawings are not supported)"),
)


def _describe_non_image(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    for prefixes, kind in _KNOWN_KINDS:
        if head.startswith(prefixes):
            return f"not an image: {kind}"
    if _looks_like_text(data[:4096]):
        return f"not an image: looks like a text file ({len(data):,} bytes)"
    return f"not an image: unrecognised binary data ({len(data):,} bytes)"


def _looks_like_text(sample: bytes) -> bool:
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(sample) - 3:  # not just a character cut at the sample's end
            return False
        text = sample[:error.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


# Pillow's messages sometimes quote header bytes (``b'II*\x00...'``): keep them out of reasons.
_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def _without_bytes(message: str) -> str:
    return _BYTES_LITERAL.sub("<bytes>", message)


def open_image(data: bytes, *, min_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> fully loaded RGB image, or ImageDecodeError with a readable reason.

    ``min_size``: the smallest side the caller needs; JPEGs are decoded at the smallest
    DCT scale that keeps both sides at least that big (Pillow draft mode: ~3x faster
    for a 2000 px scan going to a 224 px model).
    """
    image, pages = _opened(data, min_size, max_pixels)
    full_width, full_height = image.info["full_size"]
    drafted = image.size
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # (a plain call copies every image, turned or not)
        image = to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise _decode_error(error, image.format or "image") from None
    # Only the first page or frame is decoded; callers say what happened to the rest.
    image.info["pages"] = pages
    # the size of the map as its file holds it (turned as its EXIF says), not the decoded scale
    turned = drafted[0] != drafted[1] and image.size == drafted[::-1]
    image.info["full_size"] = (full_height, full_width) if turned else (full_width, full_height)
    return image


def open_query_image(data: bytes, *, min_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                     max_decoded_bytes: int = DEFAULT_MAX_QUERY_DECODED_BYTES) -> Image.Image:
    """Bytes -> an RGB image with both sides at least ``min_size`` and less than about twice that,
    decoding within ``max_decoded_bytes`` (from the header, before any pixel is decoded).

    For an image a search is given, where only the model's input size matters: JPEGs are drafted;
    other formats cannot be decoded at a reduced scale, so their full decode is what the cap bounds,
    and they are box-reduced right after it, before any conversion; nothing full-size outlives the call."""
    image, pages = _opened(data, min_size, max_pixels)
    width, height = image.size  # after draft(): the scale the decoder will really use
    needed = width * height * _decode_bytes_per_pixel(image.mode)
    if needed > max_decoded_bytes:
        side = int(max(width, height) * (max_decoded_bytes / needed) ** 0.5)
        raise ImageDecodeError(
            f"too large to decode for a search: a {width}x{height} {image.format or 'image'} takes "
            f"{needed / 2**20:.0f} MB decoded, limit {max_decoded_bytes / 2**20:.0f} MB; resize it to at most "
            f"{side} px on its longest side (the model sees {min_size} px), or send it as a JPEG")
    try:
        image.load()
        orientation = _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation))  # (PNG: after the pixels)
        if image.mode not in _REDUCIBLE_MODES:
            image = to_rgb(image)
        factor = min(image.size) // min_size
        if factor > 1:
            image = image.reduce(factor)
        if orientation is not None:
            image = image.transpose(orientation)
        image = to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise _decode_error(error, image.format or "image") from None
    image.info["pages"] = pages
    return image


# Image.reduce averages pixel values: right for these, wrong for palette indices or bits.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _decode_bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel takes at the peak of decoding and reducing: decoded (Pillow keeps RGB in 4 bytes),
    plus full-size copies: Image.reduce premultiplies alpha in a copy; a mode it cannot take is
    converted first (palette -> RGBA -> RGB on white, 16-bit -> float32 working copy -> 8-bit)."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    if mode not in _REDUCIBLE_MODES:
        return stored + 9
    return 2 * stored if mode in ("LA", "RGBA") else stored


def _opened(data: bytes, min_size: int | None, max_pixels: int) -> tuple[Image.Image, int]:
    """Bytes -> (an opened, not yet decoded image within ``max_pixels``, drafted when a JPEG and
    ``min_size`` is given; its page count)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The size check below (max_pixels) replaces Pillow's warning; its hard limit still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"too many pixels (decompression bomb guard): {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(_describe_non_image(data)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise _decode_error(error, "image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"too many pixels: {width}x{height} = {width * height / 1e6:.0f} Mpx, limit {max_pixels / 1e6:.0f} Mpx"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    pages = _page_count(image)  # before load(): counting seeks through the file, then back to page 1
    image.info["full_size"] = (width, height)  # the file's own size, whatever scale it is decoded at
    try:
        if min_size and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
    except (OSError, SyntaxError, ValueError) as error:
        raise _decode_error(error, image.format or "image") from None
    return image, pages


def _page_count(image: Image.Image) -> int:
    """Pages (TIFF) or frames (GIF, WebP) in the file; 1 if a damaged later page hides the count."""
    try:
        return int(getattr(image, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, EOFError):
        try:
            image.seek(0)
        except (OSError, ValueError, EOFError):
            pass
        return 1


def _decode_error(error: Exception, kind: str) -> ImageDecodeError:
    message = _without_bytes(str(error)) or type(error).__name__
    if "truncated" in message.lower() or "premature" in message.lower():
        return ImageDecodeError(f"truncated image: {message}")
    return ImageDecodeError(f"cannot decode {kind}: {message}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited on white, 16-bit and float scaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode == "F" or image.mode.startswith("I"):
        # convert("RGB") clips these at 255: float scans in 0..1 come out black, 16-bit white.
        image = _scaled_to_8_bits(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


# Integer scans fill 8, 10, 12, 14 or 16 bits (a 12-bit camera in a 16-bit TIFF): scale by the
# smallest such range that holds the data, so a dark 16-bit scan stays dark and a 12-bit one
# is not shown at 1/16 of its brightness.
_INTEGER_FULL_SCALES = (2**8 - 1, 2**10 - 1, 2**12 - 1, 2**14 - 1, 2**16 - 1, 2**32 - 1)


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """A single-band integer ("I", "I;16"...) or float ("F") image as "L".

    Floats: 0..1 maps to 0..255 when the data lies in it; other float data (elevations,
    reflectances) is stretched over its own range.  NaN and infinities become black."""
    values = np.array(image, dtype=np.float32)  # one working copy, scaled in place (scans are big)
    if image.mode == "F":
        values[~np.isfinite(values)] = np.nan
        if np.isnan(values).all():
            values[:] = 0
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        np.nan_to_num(values, copy=False, nan=low)
        if low >= 0 and high <= 1:
            low, high = 0.0, 1.0
    else:
        low, high = min(float(values.min()), 0.0), float(values.max())  # signed data below 0 is shifted up
        high = low + next((scale for scale in _INTEGER_FULL_SCALES if high - low <= scale), high - low)
    values -= low
    values *= 255.0 / (high - low or 1.0)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8), "L")


def thumbnail_jpeg(image: Image.Image, size: int = 256, quality: int = 80) -> bytes:
    """A small JPEG for result grids (a ~10 KB BLOB per map).

    Box-reduce by an integer factor first, then a short bilinear step: cheaper than Lanczos from
    a 500 px draft, which matters because the loader's CPU budget is per image."""
    factor = int(max(image.size) // size)
    thumb = image.reduce(factor) if factor > 1 else image.copy()
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=quality)
    return out.getvalue()
