"""Reading a collection: model rows, the maps a search shows, a map's record and sheets, stored
vectors and the vector tables' state.  Every function takes an open connection (or a path for the
read-only readers) and writes nothing."""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3 as stdlib_sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import vectors
from .locations import resolved_location
from .model_rows import ModelRow
from .records import LIST_FIELDS, decode_list, display_row
from .schema import connect, is_collection, vector_meta_keys


class StoreError(ValueError):
    """A file that is not a usable mapclip database; the message says why."""


class ModelNotFound(LookupError):
    """No such model in a collection (or no model at all yet)."""


def read_models(conn) -> list[ModelRow]:
    """Every ``models`` row, oldest first (``pick_model`` says which is the default)."""
    return [ModelRow.from_row(row) for row in rows_of(conn, "SELECT * FROM models ORDER BY id")]


def read_load_commands(conn, limit: int = 1000) -> list[str]:
    """The commands of the collection's loads (newest first), [] for a file without a loads table."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'loads'").fetchone():
        return []
    rows = conn.execute("SELECT command FROM loads ORDER BY id DESC LIMIT ?", [limit]).fetchall()
    return [row[0] for row in rows if isinstance(row[0], str)]


def read_models_at(path, *, immutable: bool = False) -> list[ModelRow]:
    """``read_models`` through a read-only connection of its own to the file at ``path`` ([] when
    there is no file or no ``models`` table): for callers that must not hold a connection."""
    if not path:
        return []
    mode = "immutable=1" if immutable else "mode=ro"
    try:
        conn = stdlib_sqlite3.connect(f"{Path(path).resolve().as_uri()}?{mode}", uri=True)
    except (stdlib_sqlite3.Error, OSError, ValueError):
        return []
    try:
        return read_models(conn)
    except stdlib_sqlite3.Error:
        return []
    finally:
        conn.close()


def pick_model(models: list[ModelRow], name: str | None = None, *, where: str = "this collection") -> ModelRow:
    """The one rule for which model answers: the named one, else the default (``is_default``,
    then the oldest).  ``models`` as ``read_models`` returns them."""
    if not models:
        raise ModelNotFound(f"{where} has no embeddings yet (load it with `mapclip load ...`)")
    if name is None:
        return sorted(models, key=lambda m: (-int(m["is_default"]), m["id"]))[0]
    for model in models:
        if model.name == name:
            return model
    raise ModelNotFound(f"no model {name!r} in {where}; models: {', '.join(m['name'] for m in models)}")


# The columns of a search result; the SQL shown to users selects the same ones.
RESULT_COLUMNS = (
    "maps.id, maps.title, maps.date, maps.year, maps.place, maps.item_id, maps.sheet, "
    "maps.item_url, maps.image_url, maps.thumbnail_url, typeof(maps.thumbnail) = 'blob' AS has_thumbnail"
)


def read_result_rows(conn, map_ids) -> dict[int, dict]:
    """map id -> its result columns, for ids found by the in-memory index."""
    ids = [int(i) for i in map_ids]
    if not ids:
        return {}
    sql = f"SELECT {RESULT_COLUMNS} FROM maps WHERE id IN ({', '.join('?' * len(ids))})"
    return {row["id"]: row for row in map(display_row, rows_of(conn, sql, ids))}


def read_map_summary(conn, map_id: int) -> dict | None:
    """id, title, thumbnail_url and whether a thumbnail is stored: the "more like this" header."""
    rows = rows_of(conn, "SELECT id, title, thumbnail_url, typeof(thumbnail) = 'blob' AS has_thumbnail FROM maps WHERE id = ?",
                 [int(map_id)])
    return display_row(rows[0]) if rows else None


# A map's page: every catalogue field, and whether a thumbnail is stored (not the bytes).
MAP_RECORD_COLUMNS = ("id, source_id, source, item_id, sheet, title, date, year, place, subjects, contributors, "
                      "notes, format, item_url, image_url, thumbnail_url, width, height, "
                      "typeof(thumbnail) = 'blob' AS has_thumbnail")


MAX_SHEETS_LISTED = 500  # an atlas of many sheets lists this many on each sheet's page


def read_map_record(conn, map_id: int) -> dict | None:
    rows = rows_of(conn, f"SELECT {MAP_RECORD_COLUMNS} FROM maps WHERE id = ?", [int(map_id)])
    return display_row(rows[0]) if rows else None


def read_item_sheets(conn, item_id: str, limit: int = MAX_SHEETS_LISTED) -> list[dict]:
    """The sheets of one catalogue item (an atlas, a Sanborn volume) in sheet order, up to ``limit``."""
    return [display_row(row) for row in rows_of(
        conn, "SELECT id, sheet, title, thumbnail_url, typeof(thumbnail) = 'blob' AS has_thumbnail FROM maps "
              "WHERE item_id = ? ORDER BY sheet, id LIMIT ?", [item_id, int(limit)])]


def read_map_location(conn, map_id: int) -> str | None:
    """Where a map's pixels are, as stored (``locations.py`` resolves a local one)."""
    row = conn.execute("SELECT location FROM maps WHERE id = ? AND typeof(location) = 'text'", [int(map_id)]).fetchone()
    return row[0] if row else None


def read_sample_titles(conn, count: int) -> list[str]:
    """Up to ``count`` distinct map titles spread evenly over the collection's ids: the same sample
    every time for the same rows (one indexed lookup per title, whatever the collection's size)."""
    low, high = conn.execute("SELECT min(id), max(id) FROM maps").fetchone()
    if low is None:
        return []
    titles: list[str] = []
    for step in range(count):  # an empty or repeated title is skipped: the sample may be smaller
        target = low + (high - low) * step // max(1, count - 1)
        row = conn.execute("SELECT title FROM maps WHERE id >= ? AND typeof(title) = 'text' AND trim(title) != '' "
                           "ORDER BY id LIMIT 1", [int(target)]).fetchone()
        if row and row[0].strip() not in titles:
            titles.append(row[0].strip())
    return titles


def read_thumbnail(conn, map_id: int) -> bytes | None:
    # only a BLOB is a picture: another tool may have written any type into the column
    row = conn.execute("SELECT thumbnail FROM maps WHERE id = ? AND typeof(thumbnail) = 'blob'", [int(map_id)]).fetchone()
    return row[0] if row else None


def read_stored_vector(conn, model: dict, map_id: int) -> np.ndarray | None:
    """One map's stored vector for a model ("more like this"), or None."""
    row = conn.execute(f"SELECT embedding FROM [{model['vector_table']}] WHERE map_id = ?", [int(map_id)]).fetchone()
    return None if row is None else vectors.decode(row[0])


def read_vector_max_id(conn, vector_table: str) -> int:
    """The largest map id with a vector (one b-tree descent)."""
    return int(conn.execute(f"SELECT max(rowid) FROM [{vector_table}_rowids]").fetchone()[0] or 0)


def read_vector_id_stats(conn, vector_table: str) -> tuple[int, int, float]:
    """(count, largest, sum) of the map ids with a vector: a scan of the rowids table (~35 ms at 562,842)."""
    count, max_id, id_sum = conn.execute(
        f"SELECT count(*), max(rowid), total(rowid) FROM [{vector_table}_rowids]").fetchone()
    return int(count), int(max_id or 0), float(id_sum)


def iter_vector_ids(conn, vector_table: str, above: int | None = None) -> Iterator[int]:
    """The map ids with a vector, ascending (those above ``above`` only, when given)."""
    sql = f"SELECT rowid FROM [{vector_table}_rowids]"
    params: tuple = ()
    if above is not None:
        sql += " WHERE rowid > ?"
        params = (int(above),)
    return (row[0] for row in conn.execute(sql + " ORDER BY rowid", params))


def read_vector_blob(conn, vector_table: str, map_id: int) -> bytes | None:
    """One map's stored vector BLOB (a point lookup), or None."""
    row = conn.execute(f"SELECT embedding FROM [{vector_table}] WHERE map_id = ?", (int(map_id),)).fetchone()
    return None if row is None else row[0]


def scan_vectors(conn, vector_table: str):
    """A cursor over (map id, vector BLOB) of every row, in the vec0 table's own order (map id
    order: its chunks fill in rowid order).  No ``ORDER BY``: SQLite would sort every vector in a
    temporary b-tree first, in the reader's own memory (1.16 GB at 562,842)."""
    return conn.execute(f"SELECT map_id, embedding FROM [{vector_table}]")


def read_vector_counters(conn, vector_table: str) -> tuple[int, int]:
    """(vector writes, writes that replaced a vector) of a vector table, as ``MapStore`` counts them
    in ``mapclip_meta``; (0, 0) for a database written before the counters (or without the table)."""
    version_key, rewrites_key = vector_meta_keys(vector_table)
    try:
        values = dict(conn.execute("SELECT key, value FROM mapclip_meta WHERE key IN (?, ?)",
                                   (version_key, rewrites_key)).fetchall())
    except Exception as error:  # any sqlite3 module's OperationalError (no such table)
        if "no such table" not in str(error):
            raise
        values = {}
    return int(values.get(version_key) or 0), int(values.get(rewrites_key) or 0)


def read_vectors(conn, vector_table: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """All (map_id, vector) pairs of a vec0 table in map_id order: int64 (N,), float32 (N, dim).

    Read in chunks straight into one preallocated array (no list of N BLOBs in between)."""
    count = conn.execute(f"SELECT count(*) FROM [{vector_table}]").fetchone()[0]
    ids = np.empty(count, np.int64)
    matrix = np.empty((count, dim), np.float32)
    row = 0
    cursor = conn.execute(f"SELECT map_id, embedding FROM [{vector_table}] ORDER BY map_id")
    while True:
        chunk = cursor.fetchmany(20_000)
        if not chunk:
            break
        chunk = chunk[:count - row]  # rows added since the count wait for the next read
        ids[row:row + len(chunk)] = [r[0] for r in chunk]
        matrix[row:row + len(chunk)] = np.frombuffer(
            b"".join(r[1] for r in chunk), vectors.FLOAT32_LE).reshape(-1, dim)
        row += len(chunk)
    return ids[:row], matrix[:row]


def read_maps_readonly(db_path: str | Path, columns: tuple[str, ...]) -> list[dict]:
    """Chosen ``maps`` columns of every row, opened read-only (no vector extension needed).

    StoreError if the file is missing or holds no usable ``maps`` table."""
    if not Path(db_path).is_file():
        raise StoreError(f"no database at {db_path}")
    conn = stdlib_sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    conn.row_factory = stdlib_sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute(f"SELECT {', '.join(columns)} FROM maps ORDER BY id")]
    except stdlib_sqlite3.OperationalError as error:
        raise StoreError(f"{db_path} is not a mapclip database (no usable maps table: {error})") from None
    finally:
        conn.close()
    for row in rows:
        for name in LIST_FIELDS:
            if name in row:
                row[name] = decode_list(row[name])
        if "location" in row:
            row["location"] = resolved_location(row["location"], db_path)
    return rows


def read_kept_paths_readonly(db_path: str | Path) -> dict[str, str]:
    """source_id -> file of its kept image (``--keep-images``), opened read-only; empty for a
    database without kept images (or from before them)."""
    conn = stdlib_sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    try:
        return {row[0]: os.path.join(row[1], row[2])
                for row in conn.execute("SELECT source_id, root, path FROM kept_images")}
    except stdlib_sqlite3.OperationalError as error:
        if "no such table" not in str(error):
            raise
        return {}
    finally:
        conn.close()


def rows_of(conn, sql: str, params=()) -> list[dict]:
    cursor = conn.execute(sql, params)
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


QUERY_ENCODER_PARTS = ("text", "image", "tokenizer", "preprocess")


def read_query_encoders(conn, model_name: str | None = None) -> list[dict]:
    """The ``query_encoders`` rows (no file contents), of one model or all; [] for a file from
    before them."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'query_encoders'").fetchone():
        return []
    sql = "SELECT model, part, sha256, precision, bytes, checked, created_at FROM query_encoders"
    rows = rows_of(conn, sql + (" WHERE model = ?" if model_name else "") + " ORDER BY model, part",
                   [model_name] if model_name else [])
    return rows


class StoredQueryEncoders:
    """A model's query side as a collection file stores it, read through a read-only connection of
    its own (the server's encoder cache asks from its model thread).  ``key()`` is None when the file
    carries no complete set; ``parts()`` checks each file against its SHA-256."""

    def __init__(self, path: str | Path, model_name: str):
        self.path, self.model_name = str(path), model_name

    def _connect(self):
        return stdlib_sqlite3.connect(f"{Path(self.path).resolve().as_uri()}?mode=ro", uri=True)

    def rows(self) -> dict[str, dict]:
        try:
            stat = os.stat(self.path)
        except OSError:
            return {}
        return _query_encoder_rows(self.path, self.model_name, stat.st_mtime_ns, stat.st_size)

    def key(self) -> tuple | None:
        rows = self.rows()
        if not all(part in rows for part in QUERY_ENCODER_PARTS):
            return None
        return tuple(rows[part]["sha256"] for part in QUERY_ENCODER_PARTS)

    def parts(self, lazy: tuple[str, ...] = ()) -> tuple[dict, dict[str, str]]:
        """Each part's file, checked against its SHA-256 (StoreError if missing or altered); a part
        named in ``lazy`` is a function that reads and checks it when called (the image tower,
        89 MB for ViT-B-32, is not read until an image query needs it)."""
        rows = self.rows()
        parts = {part: functools.partial(self._part, part, rows[part]["sha256"]) for part in lazy}
        conn = self._connect()
        try:
            for part in QUERY_ENCODER_PARTS:
                if part not in parts:
                    parts[part] = self._part(part, rows[part]["sha256"], conn)
        finally:
            conn.close()
        return parts, {part: row["precision"] for part, row in rows.items() if row["precision"]}

    def _part(self, part: str, sha256: str, conn=None) -> bytes:
        own = conn is None
        conn = self._connect() if own else conn
        try:
            data = _read_encoder_file(conn, sha256)
        finally:
            if own:
                conn.close()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"the stored {part} encoder of {self.model_name} is missing or altered "
                             "(its SHA-256 does not match)")
        return data


def _read_encoder_file(conn, sha256: str) -> bytes:
    """An encoder file's bytes (b"" when missing).  Read as an incremental blob where this Python
    has it (3.11+): a third faster than a query's copy for the 65 MB text tower a server's first
    search waits for."""
    found = conn.execute("SELECT rowid, typeof(data) FROM encoder_files WHERE sha256 = ?", (sha256,)).fetchone()
    if found is None:
        return b""
    if found[1] == "blob" and hasattr(conn, "blobopen"):
        with conn.blobopen("encoder_files", "data", found[0], readonly=True) as blob:
            return blob.read()
    value = conn.execute("SELECT CAST(data AS BLOB) FROM encoder_files WHERE rowid = ?", (found[0],)).fetchone()
    return bytes(value[0]) if value and isinstance(value[0], bytes) else b""


@functools.lru_cache(maxsize=64)
def _query_encoder_rows(path: str, model_name: str, mtime_ns: int, size: int) -> dict[str, dict]:
    try:
        conn = stdlib_sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    except (stdlib_sqlite3.Error, OSError, ValueError):
        return {}
    conn.row_factory = stdlib_sqlite3.Row
    try:
        return {row["part"]: row for row in read_query_encoders(conn, model_name)}
    except stdlib_sqlite3.Error:
        return {}
    finally:
        conn.close()


def read_vector_count(conn, model) -> int:
    return conn.execute(f"SELECT count(*) FROM [{model['vector_table']}]").fetchone()[0]


def read_counts(conn) -> dict:
    """Maps, items and load errors (a table a file lacks counts 0)."""
    present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {table: conn.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0] if table in present else 0
            for table in ("maps", "items", "load_errors")}


def read_common_errors(conn, limit: int = 10) -> list[tuple[str, str, int]]:
    """(stage, reason, count) of the most frequent load errors."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'load_errors'").fetchone():
        return []
    return [tuple(row) for row in conn.execute(
        "SELECT stage, reason, count(*) n FROM load_errors GROUP BY stage, reason ORDER BY n DESC LIMIT ?",
        (limit,))]


def open_collection_readonly(path: str | Path):
    """A read-only connection (sqlite-vec loaded) to an existing collection file; StoreError if the
    file is missing or is not a collection.  Nothing is created or changed in the file."""
    if not Path(path).is_file():
        raise StoreError(f"no database at {path}")
    try:
        conn = connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    except Exception as error:
        raise StoreError(f"{path} cannot be opened as SQLite: {error}") from None
    try:
        if not is_collection(conn):
            raise StoreError(f"{path} is not a mapclip collection (it has no maps and models tables of ours)")
    except StoreError:
        conn.close()
        raise
    except Exception as error:
        conn.close()
        raise StoreError(f"{path} is not a readable SQLite database: {error}") from None
    return conn
