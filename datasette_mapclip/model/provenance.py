"""What a ``models`` row says about a model's weights, and how a machine finds them again.

A database travels (``datasette publish``, a download, a copy to a server); the directory a
checkpoint sat in on the loading machine does not.  So a ``models`` row records:

- ``checkpoint_sha256``: the identity of the weights, the only thing a server trusts;
- ``checkpoint_path``: the checkpoint's *file name* only (``best.pt``), a hint for people,
  never a path a server opens.

A server finds the weights by hash (``encoders.resolve_checkpoint``), in this order:

1. the plugin configuration, ``checkpoints:`` keyed by the model's name, its SHA-256 or the
   first 12 hex digits of it; a relative path is relative to the server's working directory
   (``/app`` inside a ``datasette publish`` / ``datasette package`` image);
2. this machine's checkpoint registry: whenever a loader records a model with a checkpoint it
   also notes hash -> absolute path here, outside the database, so ``datasette serve maps.db``
   on the machine that loaded it needs no configuration.  It lives in
   ``$MAPCLIP_CHECKPOINT_REGISTRY`` (``off`` disables it), else
   ``$XDG_CACHE_HOME/mapclip/checkpoints`` or ``~/.cache/mapclip/checkpoints``: one directory
   per SHA-256, one small file per path seen with it.

Every candidate is accepted only if its SHA-256 matches the recorded one.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

REGISTRY_ENV = "MAPCLIP_CHECKPOINT_REGISTRY"
_OFF = {"", "0", "off", "no", "none", "false"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_REGISTRY_ENTRIES = 16  # paths tried per hash, newest first


def is_sha256(value) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def recorded_file_name(path) -> str | None:
    """What a ``models`` row keeps of a checkpoint path: its file name (POSIX or Windows path)."""
    if not path:
        return None
    name = re.split(r"[\\/]", str(path).rstrip("\\/"))[-1]
    return name or None


def registry_dir() -> Path | None:
    """This machine's checkpoint registry, or None when ``$MAPCLIP_CHECKPOINT_REGISTRY`` turns it off."""
    value = os.environ.get(REGISTRY_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mapclip" / "checkpoints"


def remember_checkpoint(path, sha256: str) -> Path | None:
    """Note in this machine's registry that ``path`` held weights with this SHA-256.

    A convenience for serving on the loading machine: never raises (an unwritable home only
    means the server needs a ``checkpoints:`` entry)."""
    directory = registry_dir()
    if directory is None or not is_sha256(sha256) or not path:
        return None
    absolute = os.path.abspath(os.path.expanduser(str(path)))
    entry = directory / sha256 / (hashlib.sha1(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".path")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        temporary.write_text(absolute + "\n", encoding="utf-8", errors="surrogateescape")
        os.replace(temporary, entry)  # readers see the old entry or the new one, never half of one
    except OSError:
        return None
    return entry


def remembered_checkpoints(sha256: str) -> list[str]:
    """Paths this machine has seen holding weights with this SHA-256, newest first (unchecked)."""
    directory = registry_dir()
    if directory is None or not is_sha256(sha256):  # the hash comes from a database: never a path part
        return []
    try:
        entries = [(entry.stat().st_mtime, entry) for entry in (directory / sha256).glob("*.path")]
    except OSError:
        return []
    paths = []
    for _, entry in sorted(entries, reverse=True)[:MAX_REGISTRY_ENTRIES]:
        try:
            text = entry.read_text(encoding="utf-8", errors="surrogateescape").strip()
        except OSError:
            continue
        if text and text not in paths:
            paths.append(text)
    return paths


def row_provenance(provenance: dict) -> dict:
    """The provenance a ``models`` row records: the checkpoint path cut to its file name.

    The full path is remembered in this machine's registry (by hash) instead, so a server on
    this machine still finds the weights; one elsewhere needs a ``checkpoints:`` entry."""
    path, digest = provenance.get("checkpoint_path"), provenance.get("checkpoint_sha256")
    if path and digest:
        remember_checkpoint(path, digest)
    return {**provenance, "checkpoint_path": recorded_file_name(path)}
