"""An in-memory vector index beside sqlite-vec, for collections too big to scan per query.

sqlite-vec's ``vec0`` scans every float32 vector (562,842 x 512 on 2 cores: ~0.8 s through
Datasette), and even numpy's scan is memory-bound at ~80 ms per query (1.15 GB read).  So the
server scans an int8 copy instead (faiss's scalar quantizer, SQLite's float32 vectors untouched):
it reads a quarter of the bytes (~17 ms), and the best few hundred candidates are re-scored
exactly in float32, so the final ranking and similarities are exact whenever the true top k is
among the candidates (recall measured in bench/search_bench.py).  Filtered searches use the same
index (``search_among``): the filter's maps are scored exactly when they are few, else the scan
masks out the rest.  Collections below ``int8_min_rows`` are scanned exactly in float32.

The database stays the source of truth: the index is built from it (and its float32 vectors
cached as ``.npy`` files beside it, memory-mapped, keyed by the file's size and modification
time), and every search still reports the sqlite-vec SQL that reproduces it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INT8_MIN_ROWS = 50_000
DEFAULT_RERANK = 256
# A filter that leaves at most this many maps is answered by scoring them all exactly (a gather of
# their float32 rows); a broader one by the int8 scan with the rest masked out, then re-scoring.
EXACT_SUBSET_ROWS = 50_000


class Int8Scanner:
    """Coarse scores of a query against every vector through an int8 copy: faiss's scalar quantizer
    (``QT_8bit_direct_signed``), every vector scaled by one global factor so that inner products
    keep their order.  faiss is the well-kept library for this (SIMD scans, and ``IDSelector``
    masks for filtered searches); its codes build in about a second for 562,842 vectors."""

    def __init__(self, matrix: np.ndarray, block: int = 100_000):
        import faiss

        self.faiss = faiss
        self.count, dim = matrix.shape
        largest = max((float(np.abs(matrix[start:start + block]).max()) for start in range(0, len(matrix), block)),
                      default=0.0)
        self.scale = 127.0 / largest if largest > 0 else 1.0
        self.codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                faiss.METRIC_INNER_PRODUCT)
        for start in range(0, len(matrix), block):
            self.codes.add(np.rint(np.asarray(matrix[start:start + block], np.float32) * self.scale))

    def candidates(self, query: np.ndarray, count: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Rows of the ``count`` best coarse scores (only rows where ``allowed``, a bool mask, is true)."""
        params = None
        if allowed is not None:
            bits = np.packbits(allowed, bitorder="little")  # kept alive until the search returns
            params = self.faiss.SearchParameters(sel=self.faiss.IDSelectorBitmap(self.count, self.faiss.swig_ptr(bits)))
        query = (np.asarray(query, np.float32) * self.scale)[None]
        _, rows = self.codes.search(query, min(count, self.count), params=params)
        rows = rows[0]
        return rows[rows >= 0]


@dataclasses.dataclass
class VectorIndex:
    ids: np.ndarray            # (N,) map ids
    matrix: np.ndarray         # (N, dim) unit float32 vectors (memory-mapped when cached)
    scanner: Int8Scanner | None = None  # None: exact float32 scan
    rerank: int = DEFAULT_RERANK
    position: dict | None = None        # map id -> row when ids are not ascending ({}: binary search)

    @classmethod
    def build(cls, ids: np.ndarray, matrix: np.ndarray, *, int8_min_rows: int = INT8_MIN_ROWS,
              rerank: int = DEFAULT_RERANK) -> "VectorIndex":
        scanner = Int8Scanner(matrix) if len(ids) >= int8_min_rows else None
        return cls(ids, matrix, scanner, rerank)

    @property
    def exact(self) -> bool:
        return self.scanner is None

    def __len__(self):
        return len(self.ids)

    def vector_of(self, map_id: int) -> np.ndarray | None:
        row = self.row_of(int(map_id))
        return None if row is None else np.asarray(self.matrix[row])

    def row_of(self, map_id: int) -> int | None:
        if self.position is None:
            # Ids come in rowid order, so a binary search needs no 500k-entry dict; a dict otherwise.
            ascending = len(self.ids) < 2 or bool(np.all(self.ids[1:] > self.ids[:-1]))
            self.position = {} if ascending else {int(m): i for i, m in enumerate(self.ids)}
        if not self.position:
            row = int(np.searchsorted(self.ids, map_id))
            return row if row < len(self.ids) and int(self.ids[row]) == map_id else None
        return self.position.get(map_id)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (map ids, cosine similarities), best first."""
        query = np.asarray(query, np.float32)
        k = min(k, len(self.ids))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.exact:
            return self._best(None, np.asarray(self.matrix @ query), k)
        rows = np.sort(self.scanner.candidates(query, max(self.rerank, 2 * k)))
        return self._best(rows, np.asarray(self.matrix[rows]) @ query, k)  # exact float32 re-scoring

    def search_among(self, query: np.ndarray, k: int, allowed_ids: np.ndarray,
                     exact_up_to: int = EXACT_SUBSET_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of the maps in ``allowed_ids`` (a filter's answer): a few thousand are
        scored exactly; more go through the int8 scan with the others masked out, then re-scored."""
        query = np.asarray(query, np.float32)
        rows = self.rows_of(allowed_ids)
        if len(rows) == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.exact or len(rows) <= exact_up_to:
            return self._best(rows, np.asarray(self.matrix[rows]) @ query, min(k, len(rows)))
        allowed = np.zeros(len(self.ids), bool)
        allowed[rows] = True
        rows = np.sort(self.scanner.candidates(query, max(self.rerank, 2 * k), allowed))
        return self._best(rows, np.asarray(self.matrix[rows]) @ query, min(k, len(rows)))

    def _best(self, rows: np.ndarray | None, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        chosen = top if rows is None else rows[top]
        return self.ids[chosen], scores[top]

    def rows_of(self, map_ids: np.ndarray) -> np.ndarray:
        """Sorted rows of the given map ids (ids without a vector here are left out)."""
        map_ids = np.asarray(map_ids, np.int64)
        if self.position is None:
            self.row_of(-1)  # decides between binary search and a dict
        if not self.position:
            rows = np.searchsorted(self.ids, map_ids)
            found = rows < len(self.ids)
            found[found] = self.ids[rows[found]] == map_ids[found]
            return np.unique(rows[found])
        return np.unique(np.fromiter((self.position[i] for i in map_ids.tolist() if i in self.position), np.int64))

    # -- sidecar cache of the float32 vectors ---------------------------------------------
    def save(self, folder: Path):
        tmp = Path(str(folder) + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "ids.npy", self.ids)
        np.save(tmp / "matrix.npy", self.matrix)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path, **options) -> "VectorIndex":
        return cls.build(np.load(folder / "ids.npy"), np.load(folder / "matrix.npy", mmap_mode="r"), **options)


def fingerprint(db_path: str, vector_table: str) -> str:
    """Changes whenever the database file (or its WAL) does, so a growing collection is re-indexed."""
    parts = [os.path.abspath(db_path), vector_table]
    for path in (db_path, db_path + "-wal"):
        try:
            stat = os.stat(path)
            parts += [str(stat.st_size), str(stat.st_mtime_ns)]
        except OSError:
            parts.append("-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_folder(db_path: str, vector_table: str, config: dict) -> Path:
    """Where the float32 vectors of one database state are cached (``index_dir`` or beside the file)."""
    folder = Path(config.get("index_dir") or Path(db_path).parent)
    return folder / f"{Path(db_path).name}.{vector_table}.{fingerprint(db_path, vector_table)}.mapclip-index"


def remove_stale_caches(current: Path):
    """Delete the caches of earlier states of the same database and table (each is the size of
    every vector), and half-written ones left by an interrupted build."""
    prefix = current.name.rsplit(".", 2)[0]  # "<db file>.<vector table>"
    for folder in current.parent.glob(f"{glob.escape(prefix)}.*.mapclip-index*"):
        if folder != current and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def build_for(db_path: str, model: dict, config: dict) -> VectorIndex:
    """Read a model's vectors and index them, through the sidecar cache when it can be written."""
    from .store import connect, read_vectors

    options = {"int8_min_rows": int(config.get("int8_min_rows", INT8_MIN_ROWS)),
               "rerank": int(config.get("rerank", DEFAULT_RERANK))}
    cache = cache_folder(db_path, model["vector_table"], config)
    if (cache / "matrix.npy").exists():
        remove_stale_caches(cache)
        return VectorIndex.load(cache, **options)
    conn = connect(db_path)
    try:
        ids, matrix = read_vectors(conn, model["vector_table"], int(model["dim"]))
    finally:
        conn.close()
    if len(ids) >= options["int8_min_rows"]:  # small collections reread in milliseconds: no file
        try:
            VectorIndex(ids, matrix).save(cache)
            remove_stale_caches(cache)
            del matrix
            return VectorIndex.load(cache, **options)  # memory-mapped: the page cache holds it
        except OSError as error:
            log.warning("mapclip: cannot cache the index at %s (%s); it is rebuilt at each start", cache, error)
    return VectorIndex.build(ids, matrix, **options)


class IndexRegistry:
    """One index per (database file, vector table, database state), built once in the background.

    A server holds one registry (the plugin's state); until an index is ready, and whenever the
    database has changed since it was built, ``for_model`` answers None and searches use sqlite-vec."""

    def __init__(self):
        self.lock = threading.Lock()
        self.indexes: dict[tuple, VectorIndex] = {}
        self.building: set[tuple] = set()

    @staticmethod
    def key(db_path: str, model: dict, config: dict) -> tuple:
        return (db_path, model["vector_table"], fingerprint(db_path, model["vector_table"]),
                config.get("int8_min_rows"), config.get("rerank"))

    def for_model(self, db_path: str | None, model: dict, config: dict) -> VectorIndex | None:
        """The ready index of this model's vectors, or None (starting a build if none is under way)."""
        if not db_path or config.get("index", "auto") == "off":
            return None
        key = self.key(db_path, model, config)
        found = self.indexes.get(key)
        if found is None:
            self.ensure(key, lambda: build_for(db_path, model, config))
        return found

    def ensure(self, key, build_fn):
        """Start building ``key`` in a thread unless it exists or is being built."""
        with self.lock:
            if key in self.indexes or key in self.building:
                return
            self.building.add(key)
        threading.Thread(target=self._build, args=(key, build_fn), daemon=True, name="mapclip-index").start()

    def _build(self, key, build_fn):
        started = time.perf_counter()
        try:
            index = build_fn()
            with self.lock:
                # a changed database gets a new key: drop the index of its earlier state
                for stale in [k for k in self.indexes if k[:2] == key[:2]]:
                    del self.indexes[stale]
                self.indexes[key] = index
            log.info("mapclip: index for %s ready (%d vectors, %.1f s)", key, len(index), time.perf_counter() - started)
        except Exception:  # the SQL path still answers
            log.exception("mapclip: building the vector index failed; searching with sqlite-vec only")
        finally:
            with self.lock:
                self.building.discard(key)
