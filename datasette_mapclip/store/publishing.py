"""A copy of a collection fit to publish: the same maps, vectors, catalogue and query encoders,
without the details of the machine that loaded it (where its files were, which host and process
ran each load, where a load kept its images)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .schema import connect

# An absolute path inside a command line or a message: each becomes its last part
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/])/[^\s'\"]+")


def _local(location) -> bool:
    return isinstance(location, str) and location.startswith("/")


def _relative(location: str, root: str | None) -> str:
    if root and (location == root or location.startswith(root.rstrip("/") + "/")):
        return os.path.relpath(location, root)
    return os.path.basename(location)


def _scrub(text, root: str | None):
    """A command or a message with every absolute path cut to its file name (the load root to '.')."""
    if not isinstance(text, str):
        return text
    if root:
        text = text.replace(root.rstrip("/") + "/", "").replace(root, ".")
    return _ABSOLUTE_PATH.sub(lambda match: os.path.basename(match.group(0).rstrip("/")) or ".", text)


def copy_for_publishing(source: str | Path, target: str | Path) -> dict:
    """Copy ``source`` (read only) to a new file ``target`` and remove the machine's details from the
    copy: local file locations become relative to the folder they were loaded from, load records lose
    host, process and paths, kept-image records go; then the copy is vacuumed, so nothing removed
    stays in its free pages.  -> what was changed, by table."""
    reader = connect(f"{Path(source).resolve().as_uri()}?mode=ro", uri=True)
    writer = connect(target)
    try:
        reader.backup(writer)
    finally:
        reader.close()
    try:
        tables = {row[0] for row in writer.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        locations = [row[0] for row in writer.execute("SELECT location FROM maps") if _local(row[0])]
        root = os.path.commonpath(locations) if locations else None
        if root and len(locations) == 1:
            root = os.path.dirname(root)
        changed = {}
        writer.execute("BEGIN")
        rows = [(row[0], row[1]) for row in writer.execute("SELECT id, location FROM maps") if _local(row[1])]
        writer.executemany("UPDATE maps SET location = ? WHERE id = ?",
                           [(_relative(location, root), map_id) for map_id, location in rows])
        changed["maps.location"] = len(rows)
        if "load_errors" in tables:
            errors = writer.execute("SELECT id, source_id, location, reason FROM load_errors").fetchall()
            updates = [(_relative(location, root) if _local(location) else location, _scrub(reason, root), error_id)
                       for error_id, _, location, reason in errors]
            writer.executemany("UPDATE load_errors SET location = ?, reason = ? WHERE id = ?", updates)
            # a note's key may name a path; two keys that scrub alike keep the first (the key is unique)
            writer.executemany("UPDATE OR IGNORE load_errors SET source_id = ? WHERE id = ?",
                               [(_scrub(source_id, root), error_id) for error_id, source_id, _, _ in errors])
            changed["load_errors"] = len(updates)
        if "loads" in tables:
            loads = writer.execute("SELECT id, command, message FROM loads").fetchall()
            writer.executemany("UPDATE loads SET command = ?, message = ?, host = NULL, pid = NULL WHERE id = ?",
                               [(_scrub(command, root), _scrub(message, root), load_id)
                                for load_id, command, message in loads])
            changed["loads"] = len(loads)
        if "kept_images" in tables:
            changed["kept_images"] = writer.execute("DELETE FROM kept_images").rowcount
        writer.execute("COMMIT")
        writer.execute("VACUUM")
        writer.execute("PRAGMA journal_mode = DELETE")
    finally:
        writer.close()
    return {"root": root, "changed": changed}
