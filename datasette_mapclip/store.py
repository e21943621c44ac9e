"""The map store: one SQLite file with catalogue tables, sqlite-vec vectors and provenance.

Tables
  items        one row per catalogue item (an atlas, a Sanborn volume, a single map)
  maps         one row per embedded image (a map sheet) with its catalogue fields and
               ``location`` (where its pixels were read: URL or local path, for re-embedding)
  maps_fts     FTS5 index over the text fields of ``maps`` (Datasette uses it for ``_search``)
  models       provenance: which open_clip model made which vector table
  map_vectors_<slug>  a ``vec0`` table per model: ``map_id`` -> unit float32 embedding
  load_errors  images that could not be fetched, decoded or embedded, with a readable reason
  loads        one row per loader run: command, counts, start and end

Each batch of maps is written with its vectors in one transaction, so an interrupted load
leaves only whole batches behind and a rerun skips exactly what is already stored.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import vectors
from .records import MapRecord

SCHEMA_VERSION = 1
MAP_FIELDS = (
    "source_id", "source", "item_id", "sheet", "title", "date", "year", "place", "subjects",
    "contributors", "notes", "format", "item_url", "image_url", "location", "thumbnail_url",
)
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
    failed INTEGER
);
"""


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
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return conn.execute("select vec_version()").fetchone()[0]


def connect(path: str | Path):
    sqlite3 = sqlite3_module()
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    load_sqlite_vec(conn)
    return conn


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
        self.conn.executescript(SCHEMA)
        self.conn.execute(
            "INSERT OR IGNORE INTO mapclip_meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def close(self):
        self.conn.close()

    # -- transactions -------------------------------------------------------------
    def transaction(self):
        return _Transaction(self.conn)

    # -- models -------------------------------------------------------------------
    def register_model(self, provenance: dict, precision: str | None = None) -> dict:
        """Get or create the ``models`` row (and its vec0 table) for an encoder's provenance."""
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
        return [dict(r) for r in self.conn.execute("SELECT * FROM models ORDER BY id")]

    def model(self, name: str | None = None) -> dict:
        """A model by name, or the default one."""
        if name:
            row = self.conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        else:
            row = self.conn.execute("SELECT * FROM models ORDER BY is_default DESC, id LIMIT 1").fetchone()
        if row is None:
            known = ", ".join(m["name"] for m in self.models()) or "none yet"
            raise LookupError(f"no model {name!r} in {self.path} (models: {known})" if name else f"{self.path} has no embeddings yet")
        return dict(row)

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
        values = {name: getattr(record, name) for name in MAP_FIELDS}
        values["subjects"] = json.dumps(record.subjects) if record.subjects else None
        values["contributors"] = json.dumps(record.contributors) if record.contributors else None
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
        self.conn.execute(f"DELETE FROM [{table}] WHERE map_id = ?", (map_id,))
        self.conn.execute(f"INSERT INTO [{table}] (map_id, embedding) VALUES (?, ?)", (map_id, vectors.encode(vector)))

    def write_batch(self, model: dict, records: list[MapRecord], matrix: np.ndarray, thumbnails=None, sizes=None,
                    errors: list[tuple] = ()):
        """Maps, their vectors and any errors of this batch, in one transaction."""
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

    def record_error(self, record: MapRecord, stage: str, reason: str):
        self.conn.execute(
            """INSERT INTO load_errors (source_id, source, location, stage, reason, first_seen, last_seen)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(source_id) DO UPDATE SET stage = excluded.stage, reason = excluded.reason,
               attempts = load_errors.attempts + 1, last_seen = excluded.last_seen""",
            (record.source_id, record.source, record.location, stage, reason, now(), now()),
        )

    def start_load(self, command: str, model_name: str | None) -> int:
        return self.conn.execute(
            "INSERT INTO loads (command, model, started_at, status) VALUES (?, ?, ?, 'running') RETURNING id",
            (command, model_name, now()),
        ).fetchone()[0]

    def finish_load(self, load_id: int, status: str, loaded: int, skipped: int, failed: int):
        self.conn.execute(
            "UPDATE loads SET finished_at = ?, status = ?, loaded = ?, skipped = ?, failed = ? WHERE id = ?",
            (now(), status, loaded, skipped, failed, load_id),
        )

    # -- analysis -----------------------------------------------------------------
    def vectors(self, model_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector of a model as ``(map_ids, matrix)``: int64 (N,) and float32 (N, dim)."""
        model = self.model(model_name)
        ids, blobs = [], []
        for map_id, blob in self.conn.execute(
            f"SELECT map_id, embedding FROM [{model['vector_table']}] ORDER BY map_id"
        ):
            ids.append(map_id)
            blobs.append(blob)
        matrix = np.frombuffer(b"".join(blobs), dtype=vectors.FLOAT32_LE).reshape(len(blobs), model["dim"])
        return np.asarray(ids, dtype=np.int64), matrix.astype(np.float32)

    def counts(self) -> dict:
        return {
            "maps": self.conn.execute("SELECT count(*) FROM maps").fetchone()[0],
            "items": self.conn.execute("SELECT count(*) FROM items").fetchone()[0],
            "load_errors": self.conn.execute("SELECT count(*) FROM load_errors").fetchone()[0],
        }


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
