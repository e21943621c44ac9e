"""Third-party browser code the pages serve from the plugin's own static files: OpenSeadragon,
the deep-zoom viewer of a map's page.

It is not our code, so it is not committed: the build fetches the pinned release from the npm
registry, checks it against the registry's published SHA-512, and unpacks the viewer, its button
images and its licence into ``static/vendor/openseadragon/`` (packaged into the wheel from
there).  Visitors' browsers then load it from the site itself, never from a third-party host.

    python -m datasette_mapclip.web.vendor          # fetch it (make install and setup.py's build do)
    python -m datasette_mapclip.web.vendor --check  # exit 1 if it is missing

This module imports nothing of the plugin, so ``setup.py`` can load it before the package's
dependencies are installed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

OPENSEADRAGON_VERSION = "6.1.1"
OPENSEADRAGON_URL = f"https://registry.npmjs.org/openseadragon/-/openseadragon-{OPENSEADRAGON_VERSION}.tgz"
# The npm registry's "integrity" of that tarball (dist.integrity), so a changed file is refused.
OPENSEADRAGON_INTEGRITY = ("sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/"
                           "7l6HR1nHKfD5F3Tsw==")
STATIC = Path(__file__).resolve().parent.parent / "static"  # the package's static folder (Datasette serves it)
OPENSEADRAGON_DIR = STATIC / "vendor" / "openseadragon"
# What the page needs, relative to the plugin's static folder (Datasette serves it under
# /-/static-plugins/datasette-mapclip/).
OPENSEADRAGON_SCRIPT = "vendor/openseadragon/openseadragon.min.js"
OPENSEADRAGON_IMAGES = "vendor/openseadragon/images/"
MAX_TARBALL_BYTES = 20 * 1024 * 1024


class VendorError(RuntimeError):
    pass


def openseadragon_present(folder: Path = OPENSEADRAGON_DIR) -> bool:
    return (folder / "openseadragon.min.js").is_file() and (folder / "LICENSE.txt").is_file()


def _check_integrity(data: bytes, integrity: str = OPENSEADRAGON_INTEGRITY):
    algorithm, _, expected = integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise VendorError(f"OpenSeadragon {OPENSEADRAGON_VERSION} from the npm registry does not match its "
                          f"published {algorithm} ({digest[:16]}... != {expected[:16]}...): not installed")


def unpack_openseadragon(data: bytes, folder: Path = OPENSEADRAGON_DIR):
    """The viewer, its button images and its licence out of the npm tarball; nothing else, and no
    path from the archive is trusted (only known names are written)."""
    _check_integrity(data)
    wanted = {"package/build/openseadragon/openseadragon.min.js": "openseadragon.min.js",
              "package/LICENSE.txt": "LICENSE.txt"}
    staging = folder.with_name(folder.name + ".tmp")
    (staging / "images").mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if not member.isfile():
                continue
            if name in wanted:
                target = staging / wanted[name]
            elif name.startswith("package/build/openseadragon/images/") and name.endswith(".png") \
                    and "/" not in name.rsplit("images/", 1)[1]:
                target = staging / "images" / name.rsplit("/", 1)[1]
            else:
                continue
            target.write_bytes(archive.extractfile(member).read())
    if not openseadragon_present(staging):
        raise VendorError("the OpenSeadragon tarball lacks openseadragon.min.js or LICENSE.txt")
    (staging / "VERSION").write_text(f"openseadragon {OPENSEADRAGON_VERSION} from {OPENSEADRAGON_URL}\n")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    staging.rename(folder)


def fetch_openseadragon(folder: Path = OPENSEADRAGON_DIR, url: str = OPENSEADRAGON_URL, timeout: float = 60) -> bool:
    """Fetch and unpack it unless this version is already there; True if it was fetched."""
    version_file = folder / "VERSION"
    if openseadragon_present(folder) and version_file.is_file() and OPENSEADRAGON_VERSION in version_file.read_text():
        return False
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a pinned https URL
        data = response.read(MAX_TARBALL_BYTES + 1)
    if len(data) > MAX_TARBALL_BYTES:
        raise VendorError(f"{url} is larger than {MAX_TARBALL_BYTES} bytes")
    unpack_openseadragon(data, folder)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        present = openseadragon_present()
        print(f"OpenSeadragon {'present' if present else 'missing'} in {OPENSEADRAGON_DIR}")
        return 0 if present else 1
    try:
        fetched = fetch_openseadragon()
    except (OSError, VendorError) as error:
        print(f"Could not fetch OpenSeadragon {OPENSEADRAGON_VERSION} from the npm registry: {error}. "
              "Map pages will show the stored thumbnail instead of the deep-zoom viewer.", file=sys.stderr)
        return 1
    print(f"OpenSeadragon {OPENSEADRAGON_VERSION} {'fetched into' if fetched else 'already in'} {OPENSEADRAGON_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
