"""Where a map's pixels are: ``maps.location`` holds an http(s) URL, or a local file.  A local file
inside the collection file's folder is stored relative to that folder (``scans/a.jpg`` for
``maps.db`` beside ``scans/``), so the file names no path of the machine that loaded it and keeps
working wherever the folder is moved or served from.  A file outside it keeps its absolute path
(``mapclip publish-copy`` makes those relative in a copy).  Every read that opens a location
resolves it here, so files with absolute locations (older loads) keep working."""

from __future__ import annotations

import os
from pathlib import Path


def is_remote(location) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


def collection_folder(db_path) -> Path | None:
    """The folder a collection file lies in (None for an in-memory database)."""
    if not db_path or str(db_path) == ":memory:" or str(db_path).startswith("file:"):
        return None
    return Path(os.path.abspath(db_path)).parent


def stored_location(location, db_path):
    """A location as a collection stores it: a local file inside the collection's folder relative
    to it (POSIX separators); anything else unchanged."""
    folder = collection_folder(db_path)
    if not isinstance(location, str) or not location or is_remote(location) or folder is None:
        return location
    path = Path(location)
    if not path.is_absolute():
        return location  # already relative to the collection's folder
    for base in dict.fromkeys((folder, folder.resolve())):  # as given, and with links followed
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return location


def resolved_location(location, db_path):
    """A stored location as a reader opens it: a relative one joined to the collection's folder;
    URLs, absolute paths and empty values unchanged."""
    if not isinstance(location, str) or not location or is_remote(location) or Path(location).is_absolute():
        return location
    folder = collection_folder(db_path)
    return str(folder / location) if folder is not None else location


def local_file(location, db_path) -> Path | None:
    """The local file a stored location names, or None for a URL or an empty location.  A relative
    location cannot leave the collection's folder (``..`` parts are refused)."""
    if not isinstance(location, str) or not location or is_remote(location):
        return None
    if not Path(location).is_absolute() and ".." in Path(location).parts:
        return None
    resolved = resolved_location(location, db_path)
    return Path(resolved) if Path(resolved).is_absolute() else None
