"""The map store: one SQLite file with catalogue tables, sqlite-vec vectors and provenance.

Tables
  items        one row per catalogue item (an atlas, a Sanborn volume, a single map)
  maps         one row per embedded image (a map sheet) with its catalogue fields and
               ``location`` (where its pixels were read: URL or local path, for re-embedding)
  maps_fts     FTS5 index over the text fields of ``maps`` (Datasette uses it for ``_search``)
  maps_place   FTS5 trigram index of ``maps.place``: a ``place LIKE '%...%'`` filter finds its maps
               through it instead of reading every row
  models       provenance: which open_clip model made which vector table
  map_vectors_<slug>  a ``vec0`` table per model: ``map_id`` -> unit float32 embedding
  load_errors  images that could not be fetched, decoded or embedded, with a readable reason;
               and notes a load leaves for the publisher (stage ``metadata``, ``pages``, ``source``)
  loads        one row per loader run: command, counts, start and end, and which process ran it
  kept_images  where a load kept each fetched image (``--keep-images``), for re-embedding offline

Each batch of maps is written with its vectors in one transaction, so an interrupted load
leaves only whole batches behind and a rerun skips exactly what is already stored.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
import socket
import sqlite3 as stdlib_sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from . import vectors
from .provenance import recorded_file_name, remember_checkpoint, row_provenance
from .records import LIST_FIELDS, RECORD_FIELDS, LoadNote, MapRecord, decode_list, display_row, displayable, encode_list

SCHEMA_VERSION = 1
MAPS_TABLE = "maps"  # the table whose Datasette permissions decide who may search a collection
# SQLite's code for an interrupted statement (Datasette's time limit, sqlite-vec's "chunks iter error").
SQLITE_INTERRUPT = 9
TEXT_FIELDS = ("title", "date", "place", "subjects", "contributors", "notes", "format")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS mapclip_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    title TEXT,
    item_url TEXT,
    source TEXT,
    sheet_count INTEGER
);
CREATE TABLE IF NOT EXISTS maps (
    id INTEGER PRIMARY KEY,
    source_id TEXT NOT NULL UNIQUE,
    source TEXT,
    item_id TEXT REFERENCES items(item_id),
    sheet INTEGER,
    title TEXT,
    date TEXT,
    year INTEGER,
    place TEXT,
    subjects TEXT,
    contributors TEXT,
    notes TEXT,
    format TEXT,
    item_url TEXT,
    image_url TEXT,
    location TEXT,
    thumbnail_url TEXT,
    thumbnail BLOB,
    width INTEGER,
    height INTEGER,
    loaded_at TEXT
);
CREATE INDEX IF NOT EXISTS maps_item_sheet ON maps(item_id, sheet);
CREATE INDEX IF NOT EXISTS maps_year ON maps(year);
CREATE VIRTUAL TABLE IF NOT EXISTS maps_fts USING fts5(
    {", ".join(TEXT_FIELDS)}, content='maps', content_rowid='id'
);
CREATE TRIGGER IF NOT EXISTS maps_ai AFTER INSERT ON maps BEGIN
    INSERT INTO maps_fts(rowid, {", ".join(TEXT_FIELDS)}) VALUES (new.id, {", ".join("new." + f for f in TEXT_FIELDS)});
END;
CREATE TRIGGER IF NOT EXISTS maps_ad AFTER DELETE ON maps BEGIN
    INSERT INTO maps_fts(maps_fts, rowid, {", ".join(TEXT_FIELDS)}) VALUES ('delete', old.id, {", ".join("old." + f for f in TEXT_FIELDS)});
END;
CREATE TRIGGER IF NOT EXISTS maps_au AFTER UPDATE ON maps BEGIN
    INSERT INTO maps_fts(maps_fts, rowid, {", ".join(TEXT_FIELDS)}) VALUES ('delete', old.id, {", ".join("old." + f for f in TEXT_FIELDS)});
    INSERT INTO maps_fts(rowid, {", ".join(TEXT_FIELDS)}) VALUES (new.id, {", ".join("new." + f for f in TEXT_FIELDS)});
END;
CREATE VIRTUAL TABLE IF NOT EXISTS maps_place USING fts5(
    place, content='maps', content_rowid='id', tokenize='trigram'
);
CREATE TRIGGER IF NOT EXISTS maps_place_ai AFTER INSERT ON maps BEGIN
    INSERT INTO maps_place(rowid, place) VALUES (new.id, new.place);
END;
CREATE TRIGGER IF NOT EXISTS maps_place_ad AFTER DELETE ON maps BEGIN
    INSERT INTO maps_place(maps_place, rowid, place) VALUES ('delete', old.id, old.place);
END;
CREATE TRIGGER IF NOT EXISTS maps_place_au AFTER UPDATE OF place ON maps BEGIN
    INSERT INTO maps_place(maps_place, rowid, place) VALUES ('delete', old.id, old.place);
    INSERT INTO maps_place(rowid, place) VALUES (new.id, new.place);
END;
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    architecture TEXT NOT NULL,
    pretrained TEXT,
    checkpoint_path TEXT,
    checkpoint_sha256 TEXT,
    dim INTEGER NOT NULL,
    image_size INTEGER,
    vector_table TEXT NOT NULL UNIQUE,
    open_clip_version TEXT,
    torch_version TEXT,
    sqlite_vec_version TEXT,
    precision TEXT,
    created_at TEXT,
    is_default INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS load_errors (
    id INTEGER PRIMARY KEY,
    source_id TEXT NOT NULL UNIQUE,
    source TEXT,
    location TEXT,
    stage TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    first_seen TEXT,
    last_seen TEXT
);
CREATE TABLE IF NOT EXISTS loads (
    id INTEGER PRIMARY KEY,
    command TEXT,
    model TEXT,
    started_at TEXT,
    finished_at TEXT,
    status TEXT,
    loaded INTEGER,
    skipped INTEGER,
    failed INTEGER,
    pid INTEGER,
    host TEXT,
    updated_at TEXT,
    message TEXT
);
"""

# Images a load kept on disk (``--keep-images DIR``): the model-sized derivative of each fetched
# image, so re-embedding with another model reads it from there instead of the network.  Created
# on open, so databases from before it gain it (empty) the first time a writer opens them.
KEPT_IMAGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS kept_images (
    source_id TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER,
    kept_at TEXT
);
"""

# Columns added to ``loads`` after its first release, added to older databases on open.
LOAD_RUN_COLUMNS = {"pid": "INTEGER", "host": "TEXT", "updated_at": "TEXT", "message": "TEXT"}
# A run on another host (a database on shared storage) or from a version without pids counts
# as dead once it has not written for this long: a live load writes a batch every few seconds,
# and waits at most a couple of minutes on a server's Retry-After.
STALE_LOAD_SECONDS = 3600


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sqlite3_module():
    """A sqlite3 that can load extensions: pysqlite3 where installed (as Datasette does)."""
    try:
        import pysqlite3.dbapi2 as sqlite3  # type: ignore
    except ImportError:
        import sqlite3
    return sqlite3


class ExtensionsUnavailable(RuntimeError):
    pass


def load_sqlite_vec(conn) -> str:
    """Load sqlite-vec into a connection and return its version."""
    import sqlite_vec

    if not hasattr(conn, "enable_load_extension"):
        raise ExtensionsUnavailable(
            "this Python's sqlite3 cannot load extensions, which sqlite-vec needs. "
            "Fix: pip install pysqlite3-binary (Linux x86_64), or use a Python built with "
            "--enable-loadable-sqlite-extensions (python.org and Homebrew builds are)."
        )
    conn.enable_load_extension(True)
    try:
        sqlite_vec.load(conn)
    finally:
        # Whatever happened, SQL on this connection must never be able to call load_extension().
        conn.enable_load_extension(False)
    return conn.execute("select vec_version()").fetchone()[0]


def connect(path: str | Path):
    sqlite3 = sqlite3_module()
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    load_sqlite_vec(conn)
    return conn


def vector_meta_keys(vector_table: str) -> tuple[str, str]:
    """The ``mapclip_meta`` keys of a vector table's change counters: every vector write, and
    writes that replaced a stored vector (read by the in-memory index)."""
    return f"vectors_version:{vector_table}", f"vectors_rewritten:{vector_table}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


class MapStore:
    """Read and write a mapclip database.  ``MapStore("maps.db")`` creates the schema if needed."""

    def __init__(self, path: str | Path, *, conn=None):
        self.path = str(path)
        self.conn = conn or connect(path)
        self.sqlite_vec_version = self.conn.execute("select vec_version()").fetchone()[0]
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        had_place_index = has_place_index(self.conn)
        self.conn.executescript(SCHEMA)
        if not had_place_index:  # a file from before maps_place: index the places it already holds
            self.conn.execute("INSERT INTO maps_place(maps_place) VALUES ('rebuild')")
        self.conn.execute(
            "INSERT OR IGNORE INTO mapclip_meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        self._add_missing_load_columns()
        self.conn.executescript(KEPT_IMAGES_SCHEMA)
        self._forget_checkpoint_directories()

    def close(self):
        self.conn.close()

    # -- transactions -------------------------------------------------------------
    def transaction(self):
        return _Transaction(self.conn)

    # -- models -------------------------------------------------------------------
    def _forget_checkpoint_directories(self):
        """Files from before ``provenance.py`` recorded the loading machine's checkpoint path: keep its
        file name only, and remember the path (by hash) in this machine's checkpoint registry."""
        rows = self.conn.execute(
            "SELECT id, checkpoint_path, checkpoint_sha256 FROM models "
            "WHERE checkpoint_path LIKE '%/%' OR checkpoint_path LIKE '%\\%'").fetchall()
        if not rows:
            return
        with self.transaction():
            for model_id, path, digest in rows:
                if digest:
                    remember_checkpoint(path, digest)
                self.conn.execute("UPDATE models SET checkpoint_path = ? WHERE id = ?",
                                  (recorded_file_name(path), model_id))

    def register_model(self, provenance: dict, precision: str | None = None) -> dict:
        """Get or create the ``models`` row (and its vec0 table) for an encoder's provenance.

        The row keeps the checkpoint's SHA-256 and file name, never its directory on this
        machine (which is remembered by hash outside the database: ``provenance.py``)."""
        provenance = row_provenance(provenance)
        row = self.conn.execute("SELECT * FROM models WHERE name = ?", (provenance["name"],)).fetchone()
        if row:
            if row["dim"] != provenance["dim"]:
                raise ValueError(f"model {provenance['name']} is recorded with dim {row['dim']}, not {provenance['dim']}")
            return dict(row)
        table = "map_vectors_" + slug(provenance["name"])
        with self.transaction():
            self.conn.execute(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS [{table}] USING vec0("
                f"map_id INTEGER PRIMARY KEY, embedding float[{int(provenance['dim'])}])"
            )
            is_default = 0 if self.conn.execute("SELECT 1 FROM models LIMIT 1").fetchone() else 1
            self.conn.execute(
                """INSERT INTO models (name, architecture, pretrained, checkpoint_path, checkpoint_sha256, dim,
                   image_size, vector_table, open_clip_version, torch_version, sqlite_vec_version, precision,
                   created_at, is_default) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                (
                    provenance["name"], provenance["architecture"], provenance.get("pretrained"),
                    provenance.get("checkpoint_path"), provenance.get("checkpoint_sha256"), provenance["dim"],
                    provenance.get("image_size"), table, provenance.get("open_clip_version"),
                    provenance.get("torch_version"), self.sqlite_vec_version, precision, now(), is_default,
                ),
            )
        return dict(self.conn.execute("SELECT * FROM models WHERE name = ?", (provenance["name"],)).fetchone())

    def models(self) -> list[dict]:
        """Every ``models`` row, oldest first."""
        return read_models(self.conn)

    def model(self, name: str | None = None) -> dict:
        """A model by name, or the default one (ModelNotFound if there is none)."""
        return pick_model(self.models(), name, where=self.path)

    def set_default_model(self, name: str):
        """Mark one model as the collection's default (``models.is_default``), and no other."""
        with self.transaction():
            self.conn.execute("UPDATE models SET is_default = (name = ?)", (name,))

    def vector_count(self, model: dict) -> int:
        return self.conn.execute(f"SELECT count(*) FROM [{model['vector_table']}]").fetchone()[0]

    # -- reads used for resuming --------------------------------------------------
    def embedded_source_ids(self, model: dict) -> set[str]:
        return {
            r[0]
            for r in self.conn.execute(
                f"SELECT maps.source_id FROM maps JOIN [{model['vector_table']}] v ON v.map_id = maps.id"
            )
        }

    # -- writes -------------------------------------------------------------------
    def upsert_items(self, records: Iterable[MapRecord]):
        for record in records:
            if not record.item_id:
                continue
            self.conn.execute(
                """INSERT INTO items (item_id, title, item_url, source) VALUES (?, ?, ?, ?)
                   ON CONFLICT(item_id) DO UPDATE SET title = coalesce(excluded.title, items.title),
                   item_url = coalesce(excluded.item_url, items.item_url)""",
                (record.item_id, record.title, record.item_url, record.source),
            )
            self.conn.execute(
                "UPDATE items SET sheet_count = (SELECT count(*) FROM maps WHERE item_id = ?) WHERE item_id = ?",
                (record.item_id, record.item_id),
            )

    def upsert_map(self, record: MapRecord, *, thumbnail: bytes | None = None, size=None) -> int:
        """Insert or update one ``maps`` row by ``source_id``; returns its id.  Call inside a transaction."""
        values = {name: getattr(record, name) for name in RECORD_FIELDS}
        for name in LIST_FIELDS:
            values[name] = encode_list(values[name])
        values["thumbnail"] = thumbnail
        values["width"], values["height"] = size if size else (None, None)
        values["loaded_at"] = now()
        columns = list(values)
        # Known values win over NULLs, so a metadata-only refresh never blanks a field.
        updates = ", ".join(f"{c} = coalesce(excluded.{c}, maps.{c})" for c in columns if c != "source_id")
        row = self.conn.execute(
            f"INSERT INTO maps ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT(source_id) DO UPDATE SET {updates} RETURNING id",
            [values[c] for c in columns],
        ).fetchone()
        return row[0]

    def write_vector(self, model: dict, map_id: int, vector: np.ndarray):
        table = model["vector_table"]
        # vec0 rejects INSERT OR REPLACE: delete, then insert.
        replaced = self.conn.execute(f"DELETE FROM [{table}] WHERE map_id = ?", (map_id,)).rowcount > 0
        self.conn.execute(f"INSERT INTO [{table}] (map_id, embedding) VALUES (?, ?)", (map_id, vectors.encode(vector)))
        self._count_vector_change(table, replaced=replaced)

    def delete_vectors(self, model: dict, map_ids: Iterable[int]) -> int:
        """Delete maps' vectors of one model (their catalogue rows stay); returns how many were deleted."""
        table, deleted = model["vector_table"], 0
        with self.transaction():
            for map_id in map_ids:
                deleted += max(self.conn.execute(f"DELETE FROM [{table}] WHERE map_id = ?", (int(map_id),)).rowcount, 0)
            if deleted:
                self._count_vector_change(table, replaced=False)
        return deleted

    def _count_vector_change(self, table: str, *, replaced: bool):
        """Bump the table's change counters in ``mapclip_meta``, in the writer's transaction: how a
        server's in-memory index tells a change of these vectors from any other write (index.py)."""
        version_key, rewrites_key = vector_meta_keys(table)
        for key in (version_key, rewrites_key) if replaced else (version_key,):
            self.conn.execute("INSERT INTO mapclip_meta(key, value) VALUES (?, 1) ON CONFLICT(key) "
                              "DO UPDATE SET value = CAST(value AS INTEGER) + 1", (key,))

    def write_batch(self, model: dict, records: list[MapRecord], matrix: np.ndarray, thumbnails=None, sizes=None,
                    errors: list[tuple] = (), kept: list[tuple] = ()):
        """Maps, their vectors and any errors of this batch, in one transaction.

        ``kept``: ``(source_id, root, path, bytes)`` of images kept on disk in this batch."""
        if len(records) != len(matrix):
            raise ValueError(f"{len(records)} records but {len(matrix)} vectors")
        with self.transaction():
            for i, (record, vector) in enumerate(zip(records, matrix)):
                map_id = self.upsert_map(
                    record,
                    thumbnail=thumbnails[i] if thumbnails else None,
                    size=sizes[i] if sizes else None,
                )
                self.write_vector(model, map_id, vector)
            if records:
                self.conn.execute(
                    f"DELETE FROM load_errors WHERE source_id IN ({', '.join('?' * len(records))})",
                    [r.source_id for r in records],
                )
            for record, stage, reason in errors:
                self.record_error(record, stage, reason)
            self.upsert_items(_unique_items(records))
            for source_id, root, path, size in kept:
                self.record_kept_image(source_id, root, path, size)

    def record_error(self, record: MapRecord, stage: str, reason: str):
        self._record_problem(record.source_id, record.source, record.location, stage, reason)

    def record_note(self, note: LoadNote):
        """A note a load leaves for the publisher (a value left out, a skipped link), in load_errors."""
        self._record_problem(note.key, note.source, note.location, note.stage, note.reason)

    def clear_notes(self, stages, under: str):
        """Delete notes of these stages whose location lies under a path (a folder's previous
        notes, before the notes of this run replace them).  Call inside a transaction."""
        prefix = displayable(os.path.join(under, ""))
        for stage in stages:
            self.conn.execute(
                "DELETE FROM load_errors WHERE stage = ? AND substr(location, 1, length(?)) = ?",
                (stage, prefix, prefix))

    def _record_problem(self, key, source, location, stage, reason):
        # File names that are not UTF-8 reach here as surrogate escapes, which SQLite refuses.
        key, location, reason = (displayable(v) if isinstance(v, str) else v for v in (key, location, reason))
        self.conn.execute(
            """INSERT INTO load_errors (source_id, source, location, stage, reason, first_seen, last_seen)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(source_id) DO UPDATE SET stage = excluded.stage, reason = excluded.reason,
               attempts = load_errors.attempts + 1, last_seen = excluded.last_seen""",
            (key, source, location, stage, reason, now(), now()),
        )

    # -- kept images (--keep-images) ----------------------------------------------------
    def record_kept_image(self, source_id: str, root: str, path: str, size: int | None):
        """Where one image's kept derivative lies: ``root`` (the folder) and ``path`` inside it.
        Call inside a transaction."""
        self.conn.execute(
            "INSERT INTO kept_images (source_id, root, path, bytes, kept_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(source_id) DO UPDATE SET root = excluded.root, path = excluded.path, "
            "bytes = excluded.bytes, kept_at = excluded.kept_at",
            (displayable(source_id), displayable(root), path, size, now()))

    def kept_image_path(self, source_id: str) -> str | None:
        """The file holding a map's kept image, if one was recorded (it may since have been deleted)."""
        row = self.conn.execute("SELECT root, path FROM kept_images WHERE source_id = ?",
                                (displayable(source_id),)).fetchone()
        return os.path.join(row[0], row[1]) if row else None

    def kept_images_summary(self) -> tuple[int, int]:
        """(images kept, their bytes)."""
        count, size = self.conn.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM kept_images").fetchone()
        return int(count), int(size)

    # -- load runs ------------------------------------------------------------------
    def _add_missing_load_columns(self):
        present = {row[1] for row in self.conn.execute("PRAGMA table_info(loads)")}
        for name, kind in LOAD_RUN_COLUMNS.items():
            if name not in present:
                self.conn.execute(f"ALTER TABLE loads ADD COLUMN {name} {kind}")

    def start_load(self, command: str, model_name: str | None) -> int:
        """A ``loads`` row for this run (status 'running'), after marking runs that died."""
        self.mark_dead_loads()
        return self.conn.execute(
            "INSERT INTO loads (command, model, started_at, status, pid, host, updated_at) "
            "VALUES (?, ?, ?, 'running', ?, ?, ?) RETURNING id",
            (displayable(command), model_name, now(), os.getpid(), host_id(), now()),
        ).fetchone()[0]

    def touch_load(self, load_id: int):
        """The heartbeat of a running load (after every batch): how other hosts tell it is alive."""
        self.conn.execute("UPDATE loads SET updated_at = ? WHERE id = ?", (now(), load_id))

    def finish_load(self, load_id: int, status: str, loaded: int, skipped: int, failed: int):
        self.conn.execute(
            "UPDATE loads SET finished_at = ?, updated_at = ?, status = ?, loaded = ?, skipped = ?, failed = ? "
            "WHERE id = ?",
            (now(), now(), status, loaded, skipped, failed, load_id),
        )

    def mark_dead_loads(self, *, stale_after: float = STALE_LOAD_SECONDS) -> list[int]:
        """Mark 'running' loads whose process is gone: status 'killed', finished now, with why.

        On this host a run is dead when its pid no longer exists (a live run, here or in
        another process, is never marked; a reused pid only keeps a dead run 'running').
        A run from another host, or without a pid (older versions), is dead when it has not
        written for ``stale_after`` seconds.  Returns the ids marked."""
        marked = []
        host = host_id()
        for row in self.conn.execute(
                "SELECT id, pid, host, coalesce(updated_at, started_at) AS seen FROM loads "
                "WHERE status = 'running'").fetchall():
            why = _why_load_is_dead(row["pid"], row["host"], row["seen"], host, stale_after)
            if why:
                self.conn.execute(
                    "UPDATE loads SET status = 'killed', finished_at = ?, message = ? "
                    "WHERE id = ? AND status = 'running'", (now(), why, row["id"]))
                marked.append(row["id"])
        return marked

    # -- catalogue fields filled after loading (loc-metadata) -----------------------
    def items_missing_catalogue(self) -> list[str]:
        """Item ids whose maps have no title yet (rows from ``load csv`` or ``import-beto``)."""
        return [row[0] for row in self.conn.execute(
            "SELECT DISTINCT item_id FROM maps WHERE title IS NULL AND item_id IS NOT NULL ORDER BY item_id")]

    def fill_catalogue(self, item_id: str, fields: dict, resolved_error_id: str | None = None):
        """Set the catalogue fields of every map of one item (and the item's title), in one transaction."""
        with self.transaction():
            self._write_catalogue(item_id, fields, resolved_error_id)

    def _write_catalogue(self, item_id: str, fields: dict, resolved_error_id: str | None = None):
        names = ("title", "date", "year", "place", "subjects", "contributors", "notes", "format")
        values = [encode_list(fields.get(n)) if n in LIST_FIELDS else fields.get(n) for n in names]
        self.conn.execute(f"UPDATE maps SET {', '.join(f'{n} = ?' for n in names)} WHERE item_id = ?",
                          (*values, item_id))
        self.conn.execute("UPDATE items SET title = ? WHERE item_id = ?", (fields.get("title"), item_id))
        if resolved_error_id:
            self.conn.execute("DELETE FROM load_errors WHERE source_id = ?", (resolved_error_id,))

    # The bulk crawl's progress (``loaders/sources/loc_catalogue.py``): one row per partition of a
    # search (a date range) and one per search page fetched, written in the transaction that fills
    # that page's items, so a killed crawl resumes at the first page it had not committed.
    # Created on first use: files from before the bulk crawl gain them then, nothing else changes.
    CATALOGUE_CRAWL_SCHEMA = """
    CREATE TABLE IF NOT EXISTS loc_catalogue_partitions (
        search TEXT NOT NULL,       -- the search paged through, without paging parameters
        dates TEXT NOT NULL,        -- '' for the whole search, else 'FROM/TO' (years)
        expected INTEGER,           -- results expected before its first page (half its parent's)
        total INTEGER,              -- pagination.of, once its first page arrived
        pages INTEGER,              -- pages to fetch (0 when split into two halves)
        state TEXT NOT NULL,        -- 'todo' (first page not fetched), 'split', 'paging', 'done'
        updated_at TEXT,
        PRIMARY KEY (search, dates)
    );
    CREATE TABLE IF NOT EXISTS loc_catalogue_pages (
        search TEXT NOT NULL,
        dates TEXT NOT NULL,
        page INTEGER NOT NULL,
        results INTEGER,            -- results on the page
        filled INTEGER,             -- stored items it filled
        fetched_at TEXT,
        PRIMARY KEY (search, dates, page)
    );
    """

    def _catalogue_crawl_tables(self):
        self.conn.executescript(self.CATALOGUE_CRAWL_SCHEMA)

    def catalogue_partitions(self, search: str) -> list[dict]:
        """The stored partitions of a search, in the order they were made, each with ``done``:
        the set of its pages already fetched."""
        self._catalogue_crawl_tables()
        partitions = [dict(row, done=set()) for row in self.conn.execute(
            "SELECT * FROM loc_catalogue_partitions WHERE search = ? ORDER BY rowid", (search,))]
        by_dates = {p["dates"]: p for p in partitions}
        for dates, page in self.conn.execute(
                "SELECT dates, page FROM loc_catalogue_pages WHERE search = ?", (search,)):
            if dates in by_dates:
                by_dates[dates]["done"].add(page)
        return partitions

    def add_catalogue_partitions(self, search: str, partitions: list[tuple[str, int | None]]):
        """New partitions ``(dates, expected results)`` of a search, not yet fetched."""
        self._catalogue_crawl_tables()
        with self.transaction():
            for dates, expected in partitions:
                self.conn.execute(
                    "INSERT OR IGNORE INTO loc_catalogue_partitions (search, dates, expected, state, updated_at) "
                    "VALUES (?, ?, ?, 'todo', ?)", (search, dates, expected, now()))

    def forget_catalogue_crawl(self, search: str):
        """Drop a search's crawl progress (``loc-metadata --recrawl``); filled fields stay."""
        self._catalogue_crawl_tables()
        with self.transaction():
            self.conn.execute("DELETE FROM loc_catalogue_partitions WHERE search = ?", (search,))
            self.conn.execute("DELETE FROM loc_catalogue_pages WHERE search = ?", (search,))

    def record_catalogue_page(self, search: str, dates: str, page: int, filled: dict[str, dict], *,
                              results: int, total: int | None = None, pages: int | None = None,
                              state: str | None = None, split: list[tuple[str, int]] = (),
                              resolved_error_ids: list[str] = ()):
        """One search page, in one transaction: the catalogue fields of the stored items it held
        (``filled``: item id -> fields), the page as fetched, and what its partition now knows
        (``total``, ``pages``, ``state``; ``split``: the halves that replace it)."""
        self._catalogue_crawl_tables()
        with self.transaction():
            for item_id, fields in filled.items():
                self._write_catalogue(item_id, fields, f"metadata:{item_id}")
            for error_id in resolved_error_ids:
                self.conn.execute("DELETE FROM load_errors WHERE source_id = ?", (error_id,))
            if not split:  # a split partition's first page is not one of its halves' pages
                self.conn.execute(
                    "INSERT OR REPLACE INTO loc_catalogue_pages (search, dates, page, results, filled, fetched_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (search, dates, page, results, len(filled), now()))
            if total is not None:
                self.conn.execute("UPDATE loc_catalogue_partitions SET total = ?, pages = ? "
                                  "WHERE search = ? AND dates = ?", (total, pages, search, dates))
            for half, expected in split:
                self.conn.execute(
                    "INSERT OR IGNORE INTO loc_catalogue_partitions (search, dates, expected, state, updated_at) "
                    "VALUES (?, ?, ?, 'todo', ?)", (search, half, expected, now()))
            if state:
                self.conn.execute("UPDATE loc_catalogue_partitions SET state = ?, updated_at = ? "
                                  "WHERE search = ? AND dates = ?", (state, now(), search, dates))

    # -- reading back -----------------------------------------------------------------
    def stored_records(self) -> tuple[list[MapRecord], int]:
        """A MapRecord per ``maps`` row, for re-embedding; (records, rows without a location)."""
        records, missing = [], 0
        for row in self.conn.execute(f"SELECT {', '.join(RECORD_FIELDS)} FROM maps ORDER BY id"):
            row = dict(row)
            if not row["location"]:
                missing += 1
                continue
            for name in LIST_FIELDS:
                row[name] = decode_list(row[name])
            records.append(MapRecord(**row))
        return records, missing

    def vectors(self, model_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector of a model as ``(map_ids, matrix)``: int64 (N,) and float32 (N, dim)."""
        model = self.model(model_name)
        return read_vectors(self.conn, model["vector_table"], int(model["dim"]))

    def counts(self) -> dict:
        return {
            "maps": self.conn.execute("SELECT count(*) FROM maps").fetchone()[0],
            "items": self.conn.execute("SELECT count(*) FROM items").fetchone()[0],
            "load_errors": self.conn.execute("SELECT count(*) FROM load_errors").fetchone()[0],
        }

    def common_errors(self, limit: int = 10) -> list[tuple[str, str, int]]:
        """(stage, reason, count) of the most frequent load errors."""
        return [tuple(row) for row in self.conn.execute(
            "SELECT stage, reason, count(*) n FROM load_errors GROUP BY stage, reason ORDER BY n DESC LIMIT ?",
            (limit,))]


# -- reads on any connection (the plugin runs these in Datasette's threads) ----------------

class ModelNotFound(LookupError):
    """No such model in a collection (or no model at all yet)."""


def read_models(conn) -> list[dict]:
    """Every ``models`` row, oldest first (``pick_model`` says which is the default)."""
    return [dict(row) for row in _rows(conn, "SELECT * FROM models ORDER BY id")]


def read_load_commands(conn, limit: int = 1000) -> list[str]:
    """The commands of the collection's loads (newest first), [] for a file without a loads table."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'loads'").fetchone():
        return []
    rows = conn.execute("SELECT command FROM loads ORDER BY id DESC LIMIT ?", [limit]).fetchall()
    return [row[0] for row in rows if isinstance(row[0], str)]


def read_models_at(path, *, immutable: bool = False) -> list[dict]:
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


def pick_model(models: list[dict], name: str | None = None, *, where: str = "this collection") -> dict:
    """The one rule for which model answers: the named one, else the default (``is_default``,
    then the oldest).  ``models`` as ``read_models`` returns them."""
    if not models:
        raise ModelNotFound(f"{where} has no embeddings yet (load it with `mapclip load ...`)")
    if name is None:
        return sorted(models, key=lambda m: (-int(m["is_default"]), m["id"]))[0]
    for model in models:
        if model["name"] == name:
            return model
    raise ModelNotFound(f"no model {name!r} in {where}; models: {', '.join(m['name'] for m in models)}")


# Columns that make ``maps`` and ``models`` ours: another program's database may well have tables
# of those names (a game's levels, a GIS project's layers), and the plugin must leave it alone.
COLLECTION_COLUMNS = {
    "maps": {"id", "source_id"},
    "models": {"id", "name", "architecture", "dim", "vector_table", "is_default"},
}


def is_collection(conn) -> bool:
    """Whether a database holds a mapclip collection (``maps`` and ``models`` tables with our columns)."""
    for table, needed in COLLECTION_COLUMNS.items():
        columns = {row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))}
        if not needed <= columns:
            return False
    return True


def file_is_collection(path) -> bool:
    """``is_collection`` for a database file, cached while the file is unchanged (cheap enough to
    ask on every Datasette metadata lookup)."""
    if not path:
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return _file_is_collection(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _file_is_collection(path: str, mtime_ns: int, size: int) -> bool:
    try:
        conn = stdlib_sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    except stdlib_sqlite3.Error:
        return False
    try:
        return is_collection(conn)
    except stdlib_sqlite3.Error:
        return False
    finally:
        conn.close()


def has_place_index(conn) -> bool:
    """Whether this file has the trigram index of places (files written before it do not)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'maps_place'").fetchone() is not None


def text_indexes(conn) -> frozenset[str]:
    """Which of the optional text indexes (``maps_fts``, ``maps_place``) this file has."""
    return frozenset(row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE name IN ('maps_fts', 'maps_place')"))


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
    return {row["id"]: row for row in map(display_row, _rows(conn, sql, ids))}


def read_map_summary(conn, map_id: int) -> dict | None:
    """id, title, thumbnail_url and whether a thumbnail is stored: the "more like this" header."""
    rows = _rows(conn, "SELECT id, title, thumbnail_url, typeof(thumbnail) = 'blob' AS has_thumbnail FROM maps WHERE id = ?",
                 [int(map_id)])
    return display_row(rows[0]) if rows else None


# A map's page: every catalogue field, and whether a thumbnail is stored (not the bytes).
MAP_RECORD_COLUMNS = ("id, source_id, source, item_id, sheet, title, date, year, place, subjects, contributors, "
                      "notes, format, item_url, image_url, thumbnail_url, width, height, "
                      "typeof(thumbnail) = 'blob' AS has_thumbnail")
MAX_SHEETS_LISTED = 500  # an atlas of many sheets lists this many on each sheet's page


def read_map_record(conn, map_id: int) -> dict | None:
    rows = _rows(conn, f"SELECT {MAP_RECORD_COLUMNS} FROM maps WHERE id = ?", [int(map_id)])
    return display_row(rows[0]) if rows else None


def read_item_sheets(conn, item_id: str, limit: int = MAX_SHEETS_LISTED) -> list[dict]:
    """The sheets of one catalogue item (an atlas, a Sanborn volume) in sheet order, up to ``limit``."""
    return [display_row(row) for row in _rows(
        conn, "SELECT id, sheet, title, thumbnail_url, typeof(thumbnail) = 'blob' AS has_thumbnail FROM maps "
              "WHERE item_id = ? ORDER BY sheet, id LIMIT ?", [item_id, int(limit)])]


def read_thumbnail(conn, map_id: int) -> bytes | None:
    # only a BLOB is a picture: another tool may have written any type into the column
    row = conn.execute("SELECT thumbnail FROM maps WHERE id = ? AND typeof(thumbnail) = 'blob'", [int(map_id)]).fetchone()
    return row[0] if row else None


def read_stored_vector(conn, model: dict, map_id: int) -> np.ndarray | None:
    """One map's stored vector for a model ("more like this"), or None."""
    row = conn.execute(f"SELECT embedding FROM [{model['vector_table']}] WHERE map_id = ?", [int(map_id)]).fetchone()
    return None if row is None else vectors.decode(row[0])


# -- a vector table read directly (the in-memory index; sqlite-vec's rowids shadow table is an
# ordinary table whose rowid is the map id: small, and cheap to count and sum) --------------------

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


class StoreError(ValueError):
    """A file that is not a usable mapclip database; the message says why."""


def host_id() -> str:
    """This machine, as the ``loads`` table names it: a hash, because the table is published with the
    collection and a host name can say more about the publisher's network than they mean to."""
    return "host-" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def _why_load_is_dead(pid, run_host, last_seen, this_host: str, stale_after: float) -> str | None:
    if pid and run_host == this_host:
        exists = _process_exists(int(pid))
        if exists is False:
            return f"process {pid} on {run_host} ended without finishing (killed, or the machine stopped)"
        if exists:
            return None
    try:
        seen = datetime.datetime.fromisoformat(last_seen)
    except (TypeError, ValueError):
        return None
    idle = (datetime.datetime.now(datetime.timezone.utc) - seen).total_seconds()
    if idle < stale_after:
        return None
    where = f"process {pid} on {run_host}" if pid else "a run without a recorded process"
    return f"{where} has written nothing for {idle / 3600:.1f} hours: taken as ended without finishing"


def _process_exists(pid: int) -> bool | None:
    """Whether a process exists on this host; None when this platform cannot say safely."""
    if os.name != "posix":
        return None  # on Windows os.kill(pid, 0) sends CTRL_C_EVENT: staleness decides there
    try:
        os.kill(pid, 0)  # signal 0 delivers nothing: it only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return None
    return True


def _rows(conn, sql: str, params=()) -> list[dict]:
    cursor = conn.execute(sql, params)
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _unique_items(records: Iterable[MapRecord]) -> Iterator[MapRecord]:
    seen = set()
    for record in records:
        if record.item_id and record.item_id not in seen:
            seen.add(record.item_id)
            yield record


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (KeyboardInterrupt included)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False
