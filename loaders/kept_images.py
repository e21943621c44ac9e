"""Keep the pixels: each fetched image's model-sized derivative, stored once on disk by source id.

A load with ``--keep-images DIR`` writes every image it downloaded (a IIIF ``!512,512``
derivative, ~59 KB as a 512 px JPEG) to ``DIR/ab/cd/<sha256 of the source id>.<ext>`` and records
the file in the database's ``kept_images`` table in the same transaction as the map.  Any
later load of the same database (``fine-tune register``, a rerun, another engine) and
``fine-tune dataset`` read those files first and go back to the network only for images that
were never kept or whose file is gone.

The bytes are kept as the server sent them when the image is already model-sized (its longer
side at most ``2 x size``), so re-embedding reads exactly the pixels the first load read;
larger downloads (a plain full-size image URL) are kept as a JPEG that fits ``size x size``.
Local files (``load folder``) are read where they are and never copied.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from datasette_mapclip.model import iiif

# Formats kept as sent; anything else (TIFF, a huge download) becomes a JPEG derivative.
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
DERIVATIVE_QUALITY = 90


@dataclass
class KeptFile:
    """One image written to the keep folder: what the ``kept_images`` row records."""

    root: str
    path: str  # relative to root
    size: int  # bytes


class KeepImages:
    """Where and how a load keeps the images it fetches (``--keep-images DIR``)."""

    def __init__(self, root: str | os.PathLike, size: int = iiif.DEFAULT_SIZE):
        self.root = str(Path(root).expanduser().resolve())
        self.size = int(size)

    def check_writable(self):
        """Create the folder now, so a bad DIR fails before any image is fetched (OSError)."""
        Path(self.root).mkdir(parents=True, exist_ok=True)
        probe = Path(self.root) / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()

    @staticmethod
    def relative_path(source_id: str, extension: str) -> str:
        digest = hashlib.sha256(source_id.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{digest[:2]}/{digest[2:4]}/{digest}{extension}"

    def write(self, source_id: str, payload: tuple[bytes, str]) -> KeptFile:
        """Write one image (atomically: a killed load never leaves half a file under its name)."""
        data, extension = payload
        relative = self.relative_path(source_id, extension)
        target = Path(self.root) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
        return KeptFile(self.root, relative, len(data))


def keep_payload(data: bytes, image, size: int = iiif.DEFAULT_SIZE) -> tuple[bytes, str]:
    """(bytes, extension) to keep for a fetched image: the bytes as sent when the image is
    already model-sized, else a JPEG derivative of the decoded ``image`` fitting size x size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, (width, height) = header.format, header.size
    except Exception:  # decoded fine by open_image, but not re-openable as sent: re-encode
        fmt, width, height = None, None, None
    if fmt in _EXTENSIONS and width and max(width, height) <= 2 * size:
        return data, _EXTENSIONS[fmt]
    derivative = image.copy()
    derivative.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    derivative.convert("RGB").save(out, "JPEG", quality=DERIVATIVE_QUALITY)
    return out.getvalue(), ".jpg"


def read_kept(path: str | None) -> bytes | None:
    """A kept file's bytes, or None when there is none (never kept, or deleted since)."""
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None
