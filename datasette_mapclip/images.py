"""Decode image bytes safely into RGB: draft-mode JPEG decoding, a pixel cap, EXIF rotation.

Used by the loaders (every fetched image) and the plugin (uploads), so both refuse the
same bad inputs with the same readable reasons.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own error threshold (2 x its warning limit); LoC master TIFFs reach ~100 Mpx.
# open_image enforces its ``max_pixels`` itself, from the header, before any pixel is decoded;
# Pillow's global limit stays as the process's owner set it (runtime.limit_image_pixels).
DEFAULT_MAX_PIXELS = 178_956_970


class ImageDecodeError(ValueError):
    """An input that is not a usable image; the message says why, for a person."""


def _describe_non_image(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "not an image: the server sent an HTML page"
    if head.startswith((b"{", b"[")):
        return "not an image: got JSON"
    if head.startswith(b"%pdf"):
        return "not an image: got a PDF"
    return f"not an image: unrecognised data starting {data[:12]!r}"


def open_image(data: bytes, *, min_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> fully loaded RGB image, or ImageDecodeError with a readable reason.

    ``min_size``: the smallest side the caller needs; JPEGs are decoded at the smallest
    DCT scale that keeps both sides at least that big (Pillow draft mode: ~3x faster
    for a 2000 px scan going to a 224 px model).
    """
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
    try:
        if min_size and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise _decode_error(error, image.format or "image") from None


def _decode_error(error: Exception, kind: str) -> ImageDecodeError:
    message = str(error) or type(error).__name__
    if "truncated" in message.lower() or "premature" in message.lower():
        return ImageDecodeError(f"truncated image: {message}")
    return ImageDecodeError(f"cannot decode {kind}: {message}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited on white, 16-bit scaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale scans: scale to 8 bits (convert("RGB") would clip at 255).
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


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
