"""The schema of a collection file, its named migrations, and how a connection to one is opened.

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
  query_encoders, encoder_files  each model's query side (ONNX towers, tokenizer, preprocessing),
               files stored once by SHA-256: the file can be searched with no weights from elsewhere
  mapclip_meta the named migrations this file has had, and vector-table change counters
  ocr_models, map_words, map_words_fts, map_words_read
               the words OCR read on each map, with their boxes, the OCR model that read them
               (provenance), an FTS5 index folding case and diacritics, and a mark per map read
               (``words.py``)

Each batch of maps is written with its vectors in one transaction, so an interrupted load
leaves only whole batches behind and a rerun skips exactly what is already stored.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import sqlite3 as stdlib_sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from ..model.provenance import recorded_file_name, remember_checkpoint

MAPS_TABLE = "maps"  # the table whose Datasette permissions decide who may search a collection
# SQLite's result code for a statement cut by sqlite3_interrupt (a server's time limit)
SQLITE_INTERRUPT = 9
TEXT_FIELDS = ("title", "date", "place", "subjects", "contributors", "notes", "format")
# Word ids name their map: map_words.id = map_id * 2**WORD_ID_BITS + n (words.py says why); the
# mapclip_meta key WORD_IDS_KEY = 'by-map' marks a file whose ids do.
WORD_ID_BITS = 20
WORDS_PER_MAP = 1 << WORD_ID_BITS  # pieces of text one map's reading may hold (a 30,000 px sheet: ~10,000)
MAP_IDS_WITH_WORDS = 1 << (63 - WORD_ID_BITS)  # map ids 0 .. 2**43 - 1 can hold words
WORD_IDS_KEY = "word-ids"

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
-- What a query needs besides the vectors, per model (model/export.py): the text and image towers as
-- ONNX, the tokenizer and the image preprocessing, each file stored once by its SHA-256.
CREATE TABLE IF NOT EXISTS query_encoders (
    model TEXT NOT NULL,        -- models.name
    part TEXT NOT NULL,         -- text, image (ONNX), tokenizer (tokenizers JSON), preprocess (JSON)
    sha256 TEXT NOT NULL,       -- encoder_files.sha256
    precision TEXT,             -- int8 or fp32 (the towers)
    bytes INTEGER NOT NULL,
    checked TEXT,               -- JSON: the probe check against open_clip
    created_at TEXT,
    PRIMARY KEY (model, part)
);
CREATE TABLE IF NOT EXISTS encoder_files (
    sha256 TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS kept_images (
    source_id TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER,
    kept_at TEXT
);
-- The words printed on the maps, read by OCR (words.py, loaders/ocr.py).
CREATE TABLE IF NOT EXISTS ocr_models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,  -- engine, version and a hash of its weights and settings
    engine TEXT NOT NULL,
    engine_version TEXT,
    weights TEXT,               -- JSON: model file name -> sha256
    settings TEXT,              -- JSON: what changes the reading (OCR size, tiles, rotations, confidence)
    created_at TEXT
);
CREATE TABLE IF NOT EXISTS map_words (
    id INTEGER PRIMARY KEY,
    map_id INTEGER NOT NULL REFERENCES maps(id),
    text TEXT NOT NULL,
    confidence REAL,
    x REAL, y REAL, w REAL, h REAL,  -- the box, normalised to the full image (0..1 from the top left)
    angle REAL,                      -- reading direction, degrees counter-clockwise from horizontal
    ocr_model INTEGER NOT NULL REFERENCES ocr_models(id)
);
CREATE INDEX IF NOT EXISTS map_words_map ON map_words(map_id);
CREATE VIRTUAL TABLE IF NOT EXISTS map_words_fts USING fts5(
    text, content='map_words', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS map_words_ai AFTER INSERT ON map_words BEGIN
    INSERT INTO map_words_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS map_words_ad AFTER DELETE ON map_words BEGIN
    INSERT INTO map_words_fts(map_words_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
-- Where word ids name their map (words.py), a row whose id does not is refused, not misfiled.
CREATE TRIGGER IF NOT EXISTS map_words_id_names_map BEFORE INSERT ON map_words
WHEN (SELECT value FROM mapclip_meta WHERE key = '{WORD_IDS_KEY}') = 'by-map'
 AND (new.id < 0 OR new.id >> {WORD_ID_BITS} != new.map_id) BEGIN
    SELECT RAISE(ABORT, 'map_words.id must be map_id * {WORDS_PER_MAP} + n (n: the word''s place in its map''s reading)');
END;
CREATE TRIGGER IF NOT EXISTS map_words_au AFTER UPDATE OF text ON map_words BEGIN
    INSERT INTO map_words_fts(map_words_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO map_words_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TABLE IF NOT EXISTS map_words_read (
    map_id INTEGER PRIMARY KEY REFERENCES maps(id),  -- one reading per map
    ocr_model INTEGER NOT NULL REFERENCES ocr_models(id),
    read_at TEXT NOT NULL,
    word_count INTEGER NOT NULL,  -- 0: read, found no text
    width INTEGER,                -- the image read (the OCR-size derivative, or the file itself)
    height INTEGER,
    seconds REAL
);
"""


# Columns added to ``loads`` after its first release, added to older databases on open.
LOAD_RUN_COLUMNS = {"pid": "INTEGER", "host": "TEXT", "updated_at": "TEXT", "message": "TEXT"}


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


def map_file_into_memory(conn, megabytes: int) -> None:
    """Let SQLite read up to ``megabytes`` of the file through a memory map (PRAGMA mmap_size):
    lookups then read the operating system's cached pages in place instead of copying each into
    the connection's small page cache (word and full-text lookups on a file of gigabytes: about
    twice as fast).  Address space only: the pages are the page cache's, shared by every connection."""
    conn.execute(f"PRAGMA mmap_size = {int(megabytes) * 1024 * 1024}").fetchall()


def connect(path: str | Path, *, uri: bool = False):
    sqlite3 = sqlite3_module()
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False, uri=uri)
    conn.row_factory = sqlite3.Row
    load_sqlite_vec(conn)
    return conn


def vector_meta_keys(vector_table: str) -> tuple[str, str]:
    """The ``mapclip_meta`` keys of a vector table's change counters: every vector write, and
    writes that replaced a stored vector (read by the in-memory index)."""
    return f"vectors_version:{vector_table}", f"vectors_rewritten:{vector_table}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


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


# -- named migrations ---------------------------------------------------------------
# SCHEMA above is the current shape, created with IF NOT EXISTS on every open.  What CREATE cannot
# do for a file made by an older version is a named migration: each runs once per file, in order,
# and is recorded in mapclip_meta as ``migration:<name>``.  A new file runs them all (each a no-op
# there).  Migrations never delete a user's rows.

def _index_existing_places(conn, tables_before: set[str]):
    """maps_place arrived after the first release: index the places an older file already holds."""
    if "maps_place" not in tables_before:
        conn.execute("INSERT INTO maps_place(maps_place) VALUES ('rebuild')")


def _add_load_liveness_columns(conn, tables_before: set[str]):
    """Which process runs a load (pid, host, last write): added to ``loads`` after its first release."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(loads)")}
    for name, kind in LOAD_RUN_COLUMNS.items():
        if name not in present:
            conn.execute(f"ALTER TABLE loads ADD COLUMN {name} {kind}")


def _keep_checkpoint_file_names_only(conn, tables_before: set[str]):
    """Files from before ``provenance.py`` recorded the loading machine's checkpoint path: keep its
    file name only, and remember the path (by hash) in this machine's checkpoint registry."""
    rows = conn.execute(
        "SELECT id, checkpoint_path, checkpoint_sha256 FROM models "
        "WHERE checkpoint_path LIKE '%/%' OR checkpoint_path LIKE '%\\%'").fetchall()
    for model_id, path, digest in rows:
        if digest:
            remember_checkpoint(path, digest)
        conn.execute("UPDATE models SET checkpoint_path = ? WHERE id = ?", (recorded_file_name(path), model_id))


def _number_words_by_map(conn, tables_before: set[str]):
    """Word ids that name their map (``words.word_id``: map_id * 2**20 + n), so a words filter reads
    only the full-text index.  Words already read are renumbered (each map's in their order) and the
    index rebuilt; a file holding words of a map id outside 0 .. 2**43 - 1, or a map with more than
    2**20 words, keeps its row numbers (its searches read each word's row, as before)."""
    out_of_range = conn.execute(
        "SELECT 1 FROM map_words WHERE map_id < 0 OR map_id >= ? OR id < 0 LIMIT 1", (MAP_IDS_WITH_WORDS,)).fetchone()
    too_many = conn.execute("SELECT 1 FROM map_words GROUP BY map_id HAVING count(*) > ? LIMIT 1",
                            (WORDS_PER_MAP,)).fetchone() if not out_of_range else None
    if out_of_range or too_many:
        return
    if conn.execute(f"SELECT 1 FROM map_words WHERE id >> {WORD_ID_BITS} != map_id LIMIT 1").fetchone():
        count = conn.execute("SELECT count(*) FROM map_words").fetchone()[0]
        if count >= 1_000_000:  # ~1 minute for each 5 million words on 2 cores: say why the command waits
            print(f"mapclip: numbering this file's {count:,} words by their map, once "
                  f"(about {max(1, round(count / 5e6))} min)...", file=sys.stderr, flush=True)
        conn.execute("CREATE TEMP TABLE word_renumbering (old_id INTEGER PRIMARY KEY, new_id INTEGER NOT NULL)")
        conn.execute(f"INSERT INTO temp.word_renumbering SELECT id, (map_id << {WORD_ID_BITS})"
                     " + row_number() OVER (PARTITION BY map_id ORDER BY id) - 1 FROM map_words")
        # Through negative ids, so that no row takes an id another row still holds.
        conn.execute("UPDATE map_words SET id = -1 - id")
        conn.execute("UPDATE map_words SET id = (SELECT new_id FROM temp.word_renumbering WHERE old_id = -1 - map_words.id)")
        conn.execute("DROP TABLE temp.word_renumbering")
        conn.execute("INSERT INTO map_words_fts(map_words_fts) VALUES ('rebuild')")
    conn.execute("INSERT OR REPLACE INTO mapclip_meta(key, value) VALUES (?, 'by-map')", (WORD_IDS_KEY,))


MIGRATIONS: tuple[tuple[str, Callable], ...] = (
    ("index-existing-places", _index_existing_places),
    ("load-liveness-columns", _add_load_liveness_columns),
    ("checkpoint-file-names-only", _keep_checkpoint_file_names_only),
    ("word-ids-by-map", _number_words_by_map),
)
MIGRATION_KEY = "migration:"


def applied_migrations(conn) -> set[str]:
    return {key[len(MIGRATION_KEY):] for (key,) in conn.execute(
        "SELECT key FROM mapclip_meta WHERE key LIKE 'migration:%'")}


def prepare_schema(conn) -> list[str]:
    """Create what is missing and run the migrations this file has not had; returns their names."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    tables_before = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.executescript(SCHEMA)
    done = applied_migrations(conn)
    applied = []
    for name, migrate in MIGRATIONS:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate(conn, tables_before)
            conn.execute("INSERT OR REPLACE INTO mapclip_meta(key, value) VALUES (?, ?)", (MIGRATION_KEY + name, now()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
