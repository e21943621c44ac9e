"""An in-memory vector index beside sqlite-vec, for collections too big to scan per query.

sqlite-vec's ``vec0`` scans every vector (0.1.9: ~340 ms for 562,842 x 512 on 2 cores), and an
exact numpy scan takes ~50 ms; with the text encoder's ~60 ms that misses a 100 ms budget.  So
the server keeps an inverted-file (IVF) index: vectors grouped by their nearest of ~sqrt(N)
k-means centroids, stored contiguously per group; a query scores the centroids, then only the
vectors of the ``nprobe`` nearest groups.  Exact numpy scoring is used below ``ivf_min_rows``.

The database stays the source of truth: the index is built from it (and cached in a sidecar
``.npz`` keyed by the vector table's size and the file's modification time), and every search
still reports the sqlite-vec SQL that reproduces it, so someone with only Datasette and
sqlite-vec gets the same results (exactly, where the index is exact; recall is measured in
bench/search_bench.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from . import vectors

log = logging.getLogger(__name__)

IVF_MIN_ROWS = 100_000
DEFAULT_NPROBE = 32


def read_vectors(conn, vector_table: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """All (map_id, vector) pairs of a vec0 table, in map_id order, straight into numpy."""
    ids, chunks = [], []
    batch_ids, batch_blobs = [], []
    for map_id, blob in conn.execute(f"SELECT map_id, embedding FROM [{vector_table}] ORDER BY map_id"):
        batch_ids.append(map_id)
        batch_blobs.append(blob)
        if len(batch_blobs) == 50_000:
            ids.append(np.asarray(batch_ids, np.int64))
            chunks.append(np.frombuffer(b"".join(batch_blobs), vectors.FLOAT32_LE).reshape(-1, dim))
            batch_ids, batch_blobs = [], []
    if batch_blobs:
        ids.append(np.asarray(batch_ids, np.int64))
        chunks.append(np.frombuffer(b"".join(batch_blobs), vectors.FLOAT32_LE).reshape(-1, dim))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate(ids), np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def kmeans(matrix: np.ndarray, clusters: int, iterations: int = 12, sample: int = 60_000, seed: int = 0) -> np.ndarray:
    """Spherical k-means on a sample (unit vectors, so maximum dot product = nearest)."""
    rng = np.random.default_rng(seed)
    rows = matrix[rng.choice(len(matrix), min(sample, len(matrix)), replace=False)]
    centroids = rows[rng.choice(len(rows), clusters, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(rows @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, rows)
        empty = np.bincount(assign, minlength=clusters) == 0
        sums[empty] = rows[rng.choice(len(rows), int(empty.sum()), replace=False)]
        centroids = vectors.normalise(sums)
    return centroids


def assign_all(matrix: np.ndarray, centroids: np.ndarray, block: int = 65_536) -> np.ndarray:
    return np.concatenate([np.argmax(matrix[i:i + block] @ centroids.T, axis=1)
                           for i in range(0, len(matrix), block)]) if len(matrix) else np.zeros(0, np.int64)


@dataclasses.dataclass
class VectorIndex:
    ids: np.ndarray            # (N,) map ids, in list order
    matrix: np.ndarray         # (N, dim) unit vectors, grouped by list
    centroids: np.ndarray | None = None  # (L, dim), None for an exact index
    offsets: np.ndarray | None = None    # (L + 1,) start of each list in ids/matrix
    nprobe: int = DEFAULT_NPROBE
    position: dict | None = None         # map id -> row, built on first "more like this"

    @classmethod
    def build(cls, ids: np.ndarray, matrix: np.ndarray, *, ivf_min_rows: int = IVF_MIN_ROWS,
              nprobe: int = DEFAULT_NPROBE, lists: int | None = None) -> "VectorIndex":
        if len(ids) < ivf_min_rows:
            return cls(ids, matrix)
        lists = lists or int(np.sqrt(len(ids)) * 1.5)
        centroids = kmeans(matrix, lists)
        assign = assign_all(matrix, centroids)
        order = np.argsort(assign, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=lists))])
        return cls(ids[order], np.ascontiguousarray(matrix[order]), centroids, offsets, nprobe)

    @property
    def exact(self) -> bool:
        return self.centroids is None

    def __len__(self):
        return len(self.ids)

    def vector_of(self, map_id: int) -> np.ndarray | None:
        if self.position is None:
            self.position = {int(m): i for i, m in enumerate(self.ids)}
        row = self.position.get(int(map_id))
        return None if row is None else self.matrix[row]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (map ids, cosine similarities), best first."""
        query = np.asarray(query, np.float32)
        if self.exact:
            candidates_ids, candidates = self.ids, self.matrix
        else:
            probe = np.argpartition(-(self.centroids @ query), min(self.nprobe, len(self.centroids) - 1))[: self.nprobe]
            spans = [(self.offsets[p], self.offsets[p + 1]) for p in probe]
            rows = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, np.int64)
            if len(rows) < k:  # tiny lists: fall back to exact
                candidates_ids, candidates = self.ids, self.matrix
            else:
                candidates_ids, candidates = self.ids[rows], self.matrix[rows]
        scores = candidates @ query
        k = min(k, len(scores))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return candidates_ids[top], scores[top]

    # -- sidecar cache ------------------------------------------------------------------
    def save(self, path: Path):
        arrays = {"ids": self.ids, "matrix": self.matrix, "nprobe": np.asarray(self.nprobe)}
        if not self.exact:
            arrays.update(centroids=self.centroids, offsets=self.offsets)
        tmp = Path(str(path) + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        data = np.load(path, mmap_mode="r")
        centroids = data["centroids"] if "centroids" in data.files else None
        return cls(np.asarray(data["ids"]), np.asarray(data["matrix"]), None if centroids is None else np.asarray(centroids),
                   np.asarray(data["offsets"]) if centroids is not None else None, int(data["nprobe"]))


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


def build_for(db_path: str, model: dict, config: dict) -> VectorIndex:
    """Read a model's vectors and index them, through the sidecar cache when it can be written."""
    from .store import connect

    key = fingerprint(db_path, model["vector_table"])
    cache_dir = Path(config.get("index_dir") or Path(db_path).parent)
    cache = cache_dir / f"{Path(db_path).name}.{model['vector_table']}.{key}.mapclip-index.npz"
    if cache.exists():
        return VectorIndex.load(cache)
    conn = connect(db_path)
    try:
        ids, matrix = read_vectors(conn, model["vector_table"], int(model["dim"]))
    finally:
        conn.close()
    built = VectorIndex.build(ids, matrix, ivf_min_rows=int(config.get("ivf_min_rows", IVF_MIN_ROWS)),
                              nprobe=int(config.get("nprobe", DEFAULT_NPROBE)))
    if not built.exact:  # small collections rebuild in milliseconds: not worth a file
        try:
            built.save(cache)
        except OSError as error:
            log.warning("mapclip: cannot cache the index at %s (%s); it will be rebuilt at each start", cache, error)
    return built


class IndexRegistry:
    """One index per (database file, vector table), built once in the background."""

    def __init__(self):
        self.lock = threading.Lock()
        self.indexes: dict[tuple, VectorIndex] = {}
        self.building: set[tuple] = set()
        self.stats: dict[tuple, dict] = {}

    def get(self, key) -> VectorIndex | None:
        return self.indexes.get(key)

    def ensure(self, key, build_fn):
        """Start building ``key`` in a thread unless it exists or is being built."""
        with self.lock:
            if key in self.indexes or key in self.building:
                return
            self.building.add(key)
        threading.Thread(target=self._build, args=(key, build_fn), daemon=True, name="mapclip-index").start()

    def build_now(self, key, build_fn) -> VectorIndex:
        with self.lock:
            if key in self.indexes:
                return self.indexes[key]
        self._build(key, build_fn)
        return self.indexes[key]

    def _build(self, key, build_fn):
        started = time.perf_counter()
        try:
            index = build_fn()
            with self.lock:
                self.indexes[key] = index
                self.stats[key] = {"rows": len(index), "exact": index.exact, "seconds": time.perf_counter() - started}
            log.info("mapclip: index for %s ready (%d vectors, %.1f s)", key, len(index), time.perf_counter() - started)
        except Exception:  # the SQL path still answers
            log.exception("mapclip: building the vector index failed; searching with sqlite-vec only")
        finally:
            with self.lock:
                self.building.discard(key)


registry = IndexRegistry()
