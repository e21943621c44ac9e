"""Writing a collection: ``MapStore`` opens (and creates or upgrades) a collection file and writes
maps, vectors, model rows, load runs, errors and notes.

Each batch of maps is written with its vectors in one transaction, so an interrupted load
leaves only whole batches behind and a rerun skips exactly what is already stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..model.provenance import row_provenance
from . import vectors
from .catalogue import CatalogueCrawl
from .locations import resolved_location, stored_location
from .model_rows import ModelRow
from .reads import pick_model, read_common_errors, read_counts, read_models, read_vector_count, read_vectors
from .records import LIST_FIELDS, RECORD_FIELDS, LoadNote, MapRecord, decode_list, displayable, encode_list
from .runs import STALE_LOAD_SECONDS, host_id, why_load_is_dead
from .schema import connect, now, prepare_schema, slug, vector_meta_keys


class MapStore(CatalogueCrawl):
    """Read and write a mapclip database.  ``MapStore("maps.db")`` creates the schema if needed."""

    def __init__(self, path: str | Path, *, conn=None):
        self.path = str(path)
        self.conn = conn or connect(path)
        self.sqlite_vec_version = self.conn.execute("select vec_version()").fetchone()[0]
        prepare_schema(self.conn)

    def close(self):
        self.conn.close()

    # -- transactions -------------------------------------------------------------
    def transaction(self):
        return _Transaction(self.conn)

    # -- models -------------------------------------------------------------------
    def register_model(self, provenance: dict, precision: str | None = None) -> ModelRow:
        """Get or create the ``models`` row (and its vec0 table) for an encoder's provenance.

        The row keeps the checkpoint's SHA-256 and file name, never its directory on this
        machine (which is remembered by hash outside the database: ``provenance.py``)."""
        provenance = row_provenance(provenance)
        row = self.conn.execute("SELECT * FROM models WHERE name = ?", (provenance["name"],)).fetchone()
        if row:
            if row["dim"] != provenance["dim"]:
                raise ValueError(f"model {provenance['name']} is recorded with dim {row['dim']}, not {provenance['dim']}")
            return ModelRow.from_row(row)
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
        return ModelRow.from_row(self.conn.execute("SELECT * FROM models WHERE name = ?", (provenance["name"],)).fetchone())

    def write_query_encoders(self, model_name: str, parts: dict[str, bytes], precisions: dict[str, str],
                             check: dict):
        """Store a model's query side (model/export.py), replacing any it had; each file once by its
        SHA-256, and files no model uses any more are removed, in one transaction."""
        with self.transaction():
            self.conn.execute("DELETE FROM query_encoders WHERE model = ?", (model_name,))
            for part, data in parts.items():
                digest = hashlib.sha256(data).hexdigest()
                self.conn.execute("INSERT OR IGNORE INTO encoder_files (sha256, data) VALUES (?, ?)", (digest, data))
                self.conn.execute(
                    "INSERT INTO query_encoders (model, part, sha256, precision, bytes, checked, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (model_name, part, digest, precisions.get(part), len(data),
                     json.dumps(check, sort_keys=True) if part in ("text", "image") else None, now()))
            self.conn.execute("DELETE FROM encoder_files WHERE sha256 NOT IN (SELECT sha256 FROM query_encoders)")

    def remove_query_encoders(self, model_name: str):
        with self.transaction():
            self.conn.execute("DELETE FROM query_encoders WHERE model = ?", (model_name,))
            self.conn.execute("DELETE FROM encoder_files WHERE sha256 NOT IN (SELECT sha256 FROM query_encoders)")

    def models(self) -> list[ModelRow]:
        """Every ``models`` row, oldest first."""
        return read_models(self.conn)

    def model(self, name: str | None = None) -> ModelRow:
        """A model by name, or the default one (ModelNotFound if there is none)."""
        return pick_model(self.models(), name, where=self.path)

    def set_default_model(self, name: str):
        """Mark one model as the collection's default (``models.is_default``), and no other."""
        with self.transaction():
            self.conn.execute("UPDATE models SET is_default = (name = ?)", (name,))

    def vector_count(self, model: dict) -> int:
        return read_vector_count(self.conn, model)

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
        values["location"] = stored_location(values["location"], self.path)  # no machine path where avoidable
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
        table = model.vector_table
        # vec0 rejects INSERT OR REPLACE: delete, then insert.
        replaced = self.conn.execute(f"DELETE FROM [{table}] WHERE map_id = ?", (map_id,)).rowcount > 0
        self.conn.execute(f"INSERT INTO [{table}] (map_id, embedding) VALUES (?, ?)", (map_id, vectors.encode(vector)))
        self._count_vector_change(table, replaced=replaced)

    def delete_vectors(self, model: dict, map_ids: Iterable[int]) -> int:
        """Delete maps' vectors of one model (their catalogue rows stay); returns how many were deleted."""
        table, deleted = model.vector_table, 0
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
            why = why_load_is_dead(row["pid"], row["host"], row["seen"], host, stale_after)
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
            row["location"] = resolved_location(row["location"], self.path)
            records.append(MapRecord(**row))
        return records, missing

    def vectors(self, model_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector of a model as ``(map_ids, matrix)``: int64 (N,) and float32 (N, dim)."""
        model = self.model(model_name)
        return read_vectors(self.conn, model.vector_table, int(model.dim))

    def counts(self) -> dict:
        return read_counts(self.conn)

    def common_errors(self, limit: int = 10) -> list[tuple[str, str, int]]:
        return read_common_errors(self.conn, limit)


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
