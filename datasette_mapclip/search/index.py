"""An in-memory vector index beside sqlite-vec, for collections too big to scan per query.

sqlite-vec's ``vec0`` scans every float32 vector (562,842 x 512 on 2 cores: ~0.8 s through
Datasette), and even numpy's scan is memory-bound at ~80 ms per query (1.15 GB read).  So the
server scans an int8 copy instead (faiss's scalar quantizer, SQLite's float32 vectors untouched):
it reads a quarter of the bytes (~17 ms), and the best few hundred candidates are re-scored
exactly in float32, so the final ranking and similarities are exact whenever the true top k is
among the candidates (recall measured in bench/search_bench.py).  Filtered searches use the same
index (``search_among``): the filter's maps are scored exactly when they are few, else the scan
masks out the rest.  Collections below ``int8_min_rows`` are scanned exactly in float32.

The database stays the source of truth, and a served database may change while it is served
(Datasette's mutable mode, a loader adding maps, an editor fixing titles):

- What the index reflects is the *vector table's* state (``VectorState``): change counters that
  ``MapStore`` bumps in the same transaction as every vector write (``mapclip_meta``), plus the
  count, largest and sum of the rowids of the table's ``<table>_rowids`` shadow table, which catch
  writes made outside the store.  A catalogue edit (a title) changes none of them, so it leaves the
  index, and its cache, alone.
- Every search asks ``IndexRegistry.for_model``, which checks at most every ``index_check_interval``
  seconds, and only when the database file (or its WAL) changed, the cheap part of the state (two
  ``mapclip_meta`` values and ``max(rowid)``: ~0.05 ms at 562,842 rows).  The count and sum of the
  rowids (~35 ms at 562,842 rows) are read in the background thread, at most every
  ``index_verify_interval`` seconds.
- Maps added since the index was built are read (only those rows) into a small exact-scanned delta
  beside the big base index, and merged at query time; deleted maps are masked.  When the delta or
  the mask grows large the base is compacted (base + delta, written to the cache; no read of the
  database), and when vectors were rewritten in place (``vectors_rewritten``) the base is rebuilt
  from the database.  Either happens in the background beside the live index, which keeps
  answering meanwhile, marked ``behind`` while the database holds vector changes it does not have.
- The float32 vectors of the base are cached as ``.npy`` files (memory-mapped) in one folder per
  (database file, vector table), ``<db file>.<table>.mapclip-index``, with ``current.json`` saying
  which files and which state they hold; a new base replaces the old files, and a restart loads
  the cache and catches up with the database's later appends instead of rereading every vector.

Every search still reports the sqlite-vec SQL that reproduces it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np

from .. import store
from ..settings import DECLARED, settings_of
from ..store.model_rows import ModelRow

log = logging.getLogger(__name__)

INT8_MIN_ROWS = DECLARED["int8_min_rows"].default
DEFAULT_RERANK = DECLARED["rerank"].default
# A filter that leaves at most this many maps is answered by scoring them all exactly (a gather of
# their float32 rows); a broader one by the int8 scan with the rest masked out, then re-scoring.
EXACT_SUBSET_ROWS = DECLARED["exact_subset_rows"].default
# (How often a search checks whether the vectors changed, and how often their whole state is read
# after a write: the index_check_interval and index_verify_interval settings.)
# Past this many maps added since the base was built (or this share of the base; the
# index_delta_rows setting), or index_removed_rows deleted, the base is compacted.
DELTA_ROWS = 20_000
DELTA_SHARE = 0.05
# Backoff after a failed build, so a broken database is not reread on every search.
RETRY_AFTER = 10.0
# How long a search at start-up waits for a restart's exact index from the cache (its check reads
# the cache's ids and the vector table's state: ~0.05 s at 562,842 maps on a quiet machine).
EARLY_WAIT = 2.0
# How long the codes' loading waits for the model's at start-up (``LiveIndex.defer_codes_until``).
DEFER_LIMIT = 10.0
CACHE_FORMAT = 2
CACHE_CHUNK_ROWS = 10_000  # vectors streamed to the cache file per step (20 MB of BLOBs at 512-d)


class _PartScanner:
    """Codes split into ``parts`` of consecutive rows, (first row, faiss index), scanned side by
    side: the calling thread scans the first part, a pool of threads the others."""

    parts: list

    def __init__(self):
        self._pool = None
        self._pool_lock = threading.Lock()

    def _scan_pool(self):
        """Threads for the parts after the first (the calling thread scans the first), one faiss
        thread each; shut down when this scanner is dropped (a rebuilt base brings its own)."""
        with self._pool_lock:
            if self._pool is None:
                import weakref

                from ..runtime import set_faiss_threads

                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=len(self.parts) - 1, thread_name_prefix="mapclip-scan",
                    initializer=set_faiss_threads, initargs=(1,))
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    def _scan_parts(self, scan, count: int) -> np.ndarray:
        """Rows of the ``count`` best scores over every part; ``scan(part)`` -> (scores, rows)."""
        if len(self.parts) == 1:
            return scan(self.parts[0])[1]
        others = [self._scan_pool().submit(scan, part) for part in self.parts[1:]]
        found = [scan(self.parts[0])] + [future.result() for future in others]
        scores = np.concatenate([s for s, _ in found])
        rows = np.concatenate([r for _, r in found])
        if len(rows) > count:
            rows = rows[np.argpartition(-scores, count - 1)[:count]]
        return rows


class Int8Scanner(_PartScanner):
    """Coarse scores of a query against every vector through an int8 copy: faiss's scalar quantizer
    (``QT_8bit_direct_signed``), every vector scaled by one global factor so that inner products
    keep their order.  faiss is the well-kept library for this (SIMD scans, and ``IDSelector``
    masks for filtered searches); its codes build in about a second for 562,842 vectors.

    faiss scans one query in one thread (its threads split a batch of queries, not one), and the
    scan decodes every code, so it is bound by the core, not by memory: the codes are split into
    ``shards`` parts scanned side by side, one thread each (562,842 maps: ~45 ms on one core, ~21 ms
    on two), and their candidates merged."""

    def __init__(self, matrix: np.ndarray | None, block: int = 25_000, *, codes=None, scale: float = 1.0):
        import faiss

        self.faiss = faiss
        super().__init__()
        self.parts: list[tuple[int, object]] = []  # (first row, faiss index of the rows from there)
        if codes is not None:  # read back from the cache (``load``)
            self.codes, self.scale, self.count = codes, scale, int(codes.ntotal)
            return
        self.count, dim = matrix.shape
        largest = max((float(np.abs(matrix[start:start + block]).max()) for start in range(0, len(matrix), block)),
                      default=0.0)
        self.scale = 127.0 / largest if largest > 0 else 1.0
        self.codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                faiss.METRIC_INNER_PRODUCT)
        for start in range(0, len(matrix), block):
            self.codes.add(np.rint(np.asarray(matrix[start:start + block], np.float32) * self.scale))

    def save(self, path: Path):
        """The codes and their scale, beside the cached float32 vectors: a restart reads them back
        (a fraction of a second) instead of quantising every vector again (~2 s at 562,842).
        (Before ``split``: the cache holds them whole, whatever the thread count that reads them.)"""
        partial = path.with_name(path.name + ".tmp")
        self.faiss.write_index(self.codes, str(partial))
        path.with_suffix(".json").write_text(json.dumps({"scale": self.scale, "rows": self.count}))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path, rows: int) -> "Int8Scanner | None":
        """Codes written by ``save`` for ``rows`` vectors, or None (missing, half-written, other rows)."""
        import faiss

        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            if meta.get("rows") != rows or not path.is_file():
                return None
            codes = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):  # faiss raises RuntimeError on a bad file
            return None
        if int(codes.ntotal) != rows:
            return None
        return cls(None, codes=codes, scale=float(meta["scale"]))

    def split(self, shards: int) -> "Int8Scanner":
        """Split the codes into ``shards`` parts of consecutive rows, scanned in parallel (the codes
        are moved, not kept twice).  Returns self."""
        shards = max(1, min(int(shards), self.count))
        if shards == 1:
            self.parts = [(0, self.codes)]
            return self
        whole, size = self.codes, self.codes.code_size
        codes = self.faiss.rev_swig_ptr(whole.codes.data(), self.count * size)  # a view, no copy
        bounds = np.linspace(0, self.count, shards + 1).astype(np.int64)
        parts = []
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            part = self.faiss.IndexScalarQuantizer(whole.d, self.faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                   self.faiss.METRIC_INNER_PRODUCT)
            self.faiss.copy_array_to_vector(np.ascontiguousarray(codes[start * size:stop * size]), part.codes)
            part.ntotal = stop - start
            parts.append((start, part))
        del codes
        self.parts, self.codes = parts, None
        return self

    def best_of(self, query: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
        """The ``count`` of ``rows`` with the best int8 scores, in no particular order: the fast-scan
        candidates narrowed from the codes in memory, so only the best few float32 rows are read
        from the memory-mapped cache (reading 1,000 of them costs more than the fast scan itself)."""
        if len(rows) <= count:
            return rows
        if not self.parts:
            self.split(1)
        size = self.parts[0][1].code_size
        codes = np.empty((len(rows), size), np.uint8)
        for start, part in self.parts:
            inside = (rows >= start) & (rows < start + part.ntotal)
            if inside.any():
                view = self.faiss.rev_swig_ptr(part.codes.data(), part.ntotal * size).reshape(part.ntotal, size)
                codes[inside] = view[rows[inside] - start]
        # direct_signed codes are the int8 value + 128: the same shift for every row, so the order
        # of ``codes @ query`` is the order of the int8 scores (without a subtraction: 5x faster)
        scores = codes.astype(np.float32) @ np.asarray(query, np.float32)
        return rows[np.argpartition(-scores, count - 1)[:count]]

    def candidates(self, query: np.ndarray, count: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Rows of the ``count`` best coarse scores (only rows where ``allowed``, a bool mask, is
        true), in no particular order."""
        if not self.parts:
            self.split(1)
        query = (np.asarray(query, np.float32) * self.scale)[None]

        def scan(part):
            start, codes = part
            params = None
            if allowed is not None:
                bits = np.packbits(allowed[start:start + codes.ntotal], bitorder="little")  # alive until it returns
                params = self.faiss.SearchParameters(
                    sel=self.faiss.IDSelectorBitmap(codes.ntotal, self.faiss.swig_ptr(bits)))
            scores, rows = codes.search(query, min(count, codes.ntotal), params=params)
            found = rows[0] >= 0
            return scores[0][found], rows[0][found] + start

        return self._scan_parts(scan, count)


class FastScanner(_PartScanner):
    """The first stage of an unfiltered search of a large collection: faiss's 4-bit product-quantiser
    fast scan (``IndexPQFastScan``: one 16-entry codebook per pair of dimensions, so dim / 2 bytes a
    vector, a quarter of the int8 codes).  Its lookup tables sit in SIMD registers, so a query reads
    72 MB at 562,842 maps instead of 288 MB and decodes nothing; its scores are coarser than int8's,
    so more candidates (``fast_candidates``, 1,000 by default) are kept, narrowed by their int8
    scores (``Int8Scanner.best_of``), and the best re-scored exactly in float32 (recall measured in
    bench/search_bench.py).  Filtered scans stay on the int8 codes: fast scan takes no id mask.
    Trained on a sample of the vectors, built after the int8 index is serving (seconds at 562,842),
    cached beside the int8 codes; split into parts of consecutive rows scanned side by side, as the
    int8 codes are (``scan_threads``)."""

    TRAIN_ROWS = 50_000

    def __init__(self, matrix: np.ndarray | None, shards: int = 1, *, parts=None, block: int = 50_000):
        import faiss

        super().__init__()
        self.faiss = faiss
        if parts is not None:  # read back from the cache (``load``)
            self.parts = parts
            self.count = sum(int(part.ntotal) for _, part in parts)
            return
        self.count, dim = matrix.shape
        sample = np.sort(np.random.default_rng(0).choice(self.count, min(self.count, self.TRAIN_ROWS), replace=False))
        trained = faiss.IndexPQFastScan(dim, dim // 2, 4, faiss.METRIC_INNER_PRODUCT)
        trained.train(np.ascontiguousarray(matrix[sample], np.float32))
        bounds = np.linspace(0, self.count, max(1, min(int(shards), self.count)) + 1).astype(np.int64)
        self.parts = []
        for first, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            part = faiss.clone_index(trained)
            for at in range(first, stop, block):
                part.add(np.ascontiguousarray(matrix[at:min(at + block, stop)], np.float32))
            self.parts.append((first, part))

    @staticmethod
    def fits(dim: int) -> bool:
        return dim >= 2 and dim % 2 == 0

    def save(self, path: Path):
        partial = path.with_name(path.name + ".tmp")
        with open(partial, "wb") as out:
            np.savez(out, starts=np.array([first for first, _ in self.parts], np.int64),
                     **{f"part{i}": self.faiss.serialize_index(part) for i, (_, part) in enumerate(self.parts)})
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path, rows: int, dim: int) -> "FastScanner | None":
        """Codes written by ``save`` for ``rows`` vectors of ``dim`` dimensions, or None."""
        import faiss

        try:
            if not path.is_file():
                return None
            with np.load(path) as saved:
                starts = saved["starts"].tolist()
                parts = [(first, faiss.deserialize_index(saved[f"part{i}"])) for i, first in enumerate(starts)]
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile):  # faiss: RuntimeError
            return None
        expected = 0
        for first, part in parts:
            if (first != expected or not isinstance(part, faiss.IndexPQFastScan) or int(part.d) != dim):
                return None
            expected += int(part.ntotal)
        if expected != rows or not parts:
            return None
        return cls(None, parts=parts)

    def candidates(self, query: np.ndarray, count: int) -> np.ndarray:
        """Rows of the ``count`` best coarse scores, in no particular order."""
        query = np.asarray(query, np.float32)[None]

        def scan(part):
            first, codes = part
            scores, rows = codes.search(query, min(count, int(codes.ntotal)))
            found = rows[0] >= 0
            return scores[0][found], rows[0][found] + first

        return self._scan_parts(scan, count)


def fast_file_of(scanner_file: Path | None) -> Path | None:
    """Where the fast-scan codes of a cached base go: beside its int8 codes, under the same tag."""
    if scanner_file is None:
        return None
    return scanner_file.with_name(scanner_file.name.replace(".int8.faiss", ".pq4fs.npz"))


@dataclasses.dataclass(frozen=True)
class VectorState:
    """What a vector table holds, as far as the index can tell without reading the vectors."""

    version: int    # mapclip_meta 'vectors_version:<table>': bumped by MapStore at every vector write
    rewrites: int   # mapclip_meta 'vectors_rewritten:<table>': bumped when a write replaced a vector
    max_id: int     # max(rowid) of <table>_rowids (the vec0 rowid is the map id)
    count: int | None = None   # count(*) of <table>_rowids  (None: not read, the quick check)
    id_sum: float | None = None  # total(rowid) of <table>_rowids

    def quick(self) -> tuple:
        return (self.version, self.rewrites, self.max_id)

    def as_list(self) -> list:
        return [self.version, self.rewrites, self.max_id, self.count, self.id_sum]


def _scores(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``matrix @ query`` in numpy's own loop, not BLAS: OpenBLAS starts threads for a product this
    size and leaves them spinning afterwards, on the core the model thread's next text encoding
    needs (filtered searches at 562,842 maps: p50 68 -> 41 ms).  As fast on one core (memory-bound)."""
    return np.einsum("ij,j->i", matrix, query)


def _empty(dim: int):
    return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)


def release_resident_pages(matrix) -> bool:
    """Drop a memory-mapped matrix's pages from this process's resident set (``MADV_DONTNEED`` on a
    read-only file mapping: the data stays in the page cache, shared and evictable, and a later
    read maps a page back).  True if it was a mapping that could be released."""
    import mmap

    mapping = getattr(matrix, "_mmap", None)
    base = getattr(matrix, "base", None)
    while mapping is None and base is not None:  # a view of a np.memmap
        mapping = getattr(base, "_mmap", None) if not isinstance(base, mmap.mmap) else base
        base = getattr(base, "base", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        return False
    return True


@dataclasses.dataclass
class VectorIndex:
    """The vectors of one model: a base (``ids``, ``matrix``, the int8 ``scanner``), plus the maps
    added since the base was built (``added_ids``/``added_matrix``, scanned exactly) and the base
    rows whose map has gone since (``removed``).  Rows number the base first, then the added maps.
    An index is never changed once published: ``with_changes`` makes the next one, sharing the base."""

    ids: np.ndarray            # (N,) map ids of the base
    matrix: np.ndarray         # (N, dim) unit float32 vectors (memory-mapped when cached)
    scanner: Int8Scanner | None = None  # None: exact float32 scan
    rerank: int = DEFAULT_RERANK
    position: dict | None = None        # map id -> row when ids are not ascending ({}: binary search)
    added_ids: np.ndarray | None = None      # (M,) ascending map ids added since the base was built
    added_matrix: np.ndarray | None = None   # (M, dim)
    removed: np.ndarray | None = None        # (N,) bool: base rows whose map is gone (None: none)
    state: VectorState | None = None         # the database state this index holds
    behind: bool = False                     # the database holds vector changes this index lacks
    removed_count: int = 0
    provisional: bool = False                # exact scans of the cache while the real index loads
    fast: FastScanner | None = None          # 4-bit fast-scan codes: first stage of unfiltered searches
    fast_candidates: int = DECLARED["fast_candidates"].default  # fast-scan candidates re-scored exactly
    fast_file: Path | None = None            # where the fast-scan codes of this base are cached

    def __post_init__(self):
        if self.added_ids is None:
            self.added_ids, self.added_matrix = _empty(self.matrix.shape[1] if self.matrix.ndim == 2 else 0)

    @classmethod
    def build(cls, ids: np.ndarray, matrix: np.ndarray, *, int8_min_rows: int = INT8_MIN_ROWS,
              rerank: int = DEFAULT_RERANK, scanner_file: Path | None = None,
              scan_threads: int = 1, fast_candidates: int = DECLARED["fast_candidates"].default) -> "VectorIndex":
        """``scanner_file``: where the int8 codes of these vectors are cached (read when present,
        written when built); ``scan_threads``: threads that scan one query's codes, each a part.
        Fast-scan codes are read from beside them when cached (``with_fast_scan`` builds them)."""
        scanner = fast = None
        if len(ids) >= int8_min_rows:
            scanner = Int8Scanner.load(scanner_file, len(ids)) if scanner_file is not None else None
            if scanner is None:
                scanner = Int8Scanner(matrix)
                if scanner_file is not None:
                    try:
                        scanner.save(scanner_file)
                    except (OSError, RuntimeError) as error:  # faiss reports write failures as RuntimeError
                        log.warning("mapclip: cannot cache the int8 codes at %s (%s)", scanner_file, error)
            scanner.split(scan_threads)
            if fast_file_of(scanner_file) is not None and matrix.ndim == 2:
                fast = FastScanner.load(fast_file_of(scanner_file), len(ids), matrix.shape[1])
            # Searches scan the int8 codes and read back only their candidates' float32 rows: the
            # pages that building touched (every row) need not stay in this process's memory.
            release_resident_pages(matrix)
        return cls(ids, matrix, scanner, rerank, fast=fast, fast_candidates=fast_candidates,
                   fast_file=fast_file_of(scanner_file))

    def with_fast_scan(self) -> "VectorIndex":
        """This index with fast-scan codes of its base: read from the cache when there, else built
        (and cached).  The same base, shared, not copied."""
        if self.scanner is None or self.fast is not None or not FastScanner.fits(self.matrix.shape[1]):
            return self
        fast = FastScanner.load(self.fast_file, len(self.ids), self.matrix.shape[1]) if self.fast_file else None
        if fast is None:
            fast = FastScanner(self.matrix, len(self.scanner.parts) or 1)
            release_resident_pages(self.matrix)
            if self.fast_file is not None:
                try:
                    fast.save(self.fast_file)
                except (OSError, RuntimeError) as error:
                    log.warning("mapclip: cannot cache the fast-scan codes at %s (%s)", self.fast_file, error)
        return dataclasses.replace(self, fast=fast)

    def uses_fast_scan(self, k: int | None) -> bool:
        """Whether a search for ``k`` maps starts with the fast-scan codes (else the int8 codes): a
        short list only, since its coarser scores need many more candidates than ``k``."""
        return self.fast is not None and k is not None and 8 * k <= self.fast_candidates

    def scan_name(self, k: int | None) -> str:
        """How a search for ``k`` maps is answered, as ``searched_with`` says it (None: a masked scan)."""
        if self.exact:
            return "in-memory exact"
        return "in-memory " + ("fast-scan" if self.uses_fast_scan(k) else "int8") + " + exact re-scoring"

    def _candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        """Base rows to re-score exactly for the best ``k`` (deleted maps' rows may be among them)."""
        if self.uses_fast_scan(k):
            rows = self.fast.candidates(query, self.fast_candidates + self.removed_count)
            return self.scanner.best_of(query, rows, max(self.rerank, 2 * k) + self.removed_count)
        return self.scanner.candidates(query, max(self.rerank, 2 * k) + self.removed_count)

    @property
    def exact(self) -> bool:
        return self.scanner is None

    @property
    def changes(self) -> int:
        """Maps added or deleted since the base was built."""
        return len(self.added_ids) + self.removed_count

    def __len__(self):
        return len(self.ids) - self.removed_count + len(self.added_ids)

    def live_ids(self) -> np.ndarray:
        """Every map id this index answers with, ascending."""
        base = self.ids if not self.removed_count else self.ids[~self.removed]
        return np.sort(np.concatenate([base, self.added_ids])) if len(self.added_ids) else np.sort(base)

    def vector_of(self, map_id: int) -> np.ndarray | None:
        row = self.row_of(int(map_id))
        return None if row is None else self._gather(np.array([row]))[0]

    def row_of(self, map_id: int) -> int | None:
        if self.position is None:
            # Ids come in rowid order, so a binary search needs no 500k-entry dict; a dict otherwise.
            ascending = len(self.ids) < 2 or bool(np.all(self.ids[1:] > self.ids[:-1]))
            self.position = {} if ascending else {int(m): i for i, m in enumerate(self.ids)}
        if not self.position:
            row = int(np.searchsorted(self.ids, map_id))
            row = row if row < len(self.ids) and int(self.ids[row]) == map_id else None
        else:
            row = self.position.get(map_id)
        if row is not None and self.removed_count and self.removed[row]:
            row = None
        if row is None and len(self.added_ids):
            at = int(np.searchsorted(self.added_ids, map_id))
            if at < len(self.added_ids) and int(self.added_ids[at]) == map_id:
                row = len(self.ids) + at
        return row

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (map ids, cosine similarities), best first."""
        query = np.asarray(query, np.float32)
        k = min(k, len(self))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if not self.changes:
            if self.exact:
                return self._best(None, _scores(self.matrix, query), k)
            rows = np.sort(self._candidates(query, k))
            return self._best(rows, _scores(self._base_rows(rows), query), k)  # exact float32 re-scoring
        # The base's best (deleted maps left out), and every added map scored exactly.
        if self.exact:
            rows = np.flatnonzero(~self.removed) if self.removed_count else np.arange(len(self.ids))
            scores = _scores(self.matrix, query)[rows]
        else:
            rows = self._candidates(query, k)
            if self.removed_count:
                rows = rows[~self.removed[rows]]
            rows = np.sort(rows)
            scores = _scores(self._base_rows(rows), query)
        if len(self.added_ids):
            rows = np.concatenate([rows, len(self.ids) + np.arange(len(self.added_ids))])
            scores = np.concatenate([scores, _scores(self.added_matrix, query)])
        return self._best(rows, scores, min(k, len(rows)))

    def search_among(self, query: np.ndarray, k: int, allowed_ids: np.ndarray,
                     exact_up_to: int = EXACT_SUBSET_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of the maps in ``allowed_ids`` (a filter's answer): a few thousand are
        scored exactly; more go through the int8 scan with the others masked out, then re-scored."""
        query = np.asarray(query, np.float32)
        rows = self.rows_of(allowed_ids)
        if len(rows) == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.exact or len(rows) <= exact_up_to:
            return self._best(rows, _scores(self._gather(rows), query), min(k, len(rows)))
        base_rows, added_rows = rows[rows < len(self.ids)], rows[rows >= len(self.ids)]
        allowed = np.zeros(len(self.ids), bool)
        allowed[base_rows] = True
        rows = np.sort(self.scanner.candidates(query, max(self.rerank, 2 * k), allowed))
        rows = np.concatenate([rows, added_rows])
        return self._best(rows, _scores(self._gather(rows), query), min(k, len(rows)))

    def _best(self, rows: np.ndarray | None, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        chosen = top if rows is None else rows[top]
        return self._ids_at(chosen), scores[top]

    def _ids_at(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if not len(self.added_ids):
            return self.ids[rows]
        base = rows < len(self.ids)
        out = np.empty(len(rows), np.int64)
        out[base] = self.ids[rows[base]]
        out[~base] = self.added_ids[rows[~base] - len(self.ids)]
        return out

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of these rows (base or added), in the order given."""
        rows = np.asarray(rows, np.int64)
        if not len(self.added_ids):
            return self._base_rows(rows)
        base = rows < len(self.ids)
        out = np.empty((len(rows), self.matrix.shape[1]), np.float32)
        out[base] = self._base_rows(rows[base])
        out[~base] = self.added_matrix[rows[~base] - len(self.ids)]
        return out

    def _base_rows(self, rows: np.ndarray) -> np.ndarray:
        """Base rows' float32 vectors, copied out.  A large collection's matrix is a read-only file
        mapping: its pages are dropped from this process again after each read (~0.1 ms at 2M
        rows), so the server's resident memory stays the int8 codes and the model, and the float32
        vectors stay in the page cache, shared between server processes and evictable.  (Without
        this, the kernel's fault-around brings most of the file back after a few hundred searches.)"""
        out = np.asarray(self.matrix[rows])
        if self.scanner is not None:
            release_resident_pages(self.matrix)
        return out

    def rows_of(self, map_ids: np.ndarray) -> np.ndarray:
        """Sorted rows of the given map ids (ids without a vector here are left out)."""
        map_ids = np.asarray(map_ids, np.int64)
        if self.position is None:
            self.row_of(-1)  # decides between binary search and a dict
        if not self.position:
            rows = np.searchsorted(self.ids, map_ids)
            found = rows < len(self.ids)
            found[found] = self.ids[rows[found]] == map_ids[found]
            rows = rows[found]
        else:
            rows = np.fromiter((self.position[i] for i in map_ids.tolist() if i in self.position), np.int64)
        if self.removed_count:
            rows = rows[~self.removed[rows]]
        if len(self.added_ids):
            at = np.searchsorted(self.added_ids, map_ids)
            found = at < len(self.added_ids)
            found[found] = self.added_ids[at[found]] == map_ids[found]
            rows = np.concatenate([rows, len(self.ids) + at[found]])
        return np.unique(rows)

    def with_changes(self, added_ids: np.ndarray, added_matrix: np.ndarray, removed_ids: np.ndarray,
                     state: VectorState | None) -> "VectorIndex":
        """The next index: these maps added (or their vectors replaced) and those deleted; the base
        (its matrix, int8 codes and id lookup) is shared, not copied."""
        added_ids = np.asarray(added_ids, np.int64)
        removed_ids = np.asarray(removed_ids, np.int64)
        gone = np.concatenate([added_ids, removed_ids])
        self.row_of(-1)
        removed = self.removed
        base_rows = self.rows_of(gone)
        base_rows = base_rows[base_rows < len(self.ids)]
        if len(base_rows):
            removed = np.zeros(len(self.ids), bool) if removed is None else removed.copy()
            removed[base_rows] = True
        keep = ~np.isin(self.added_ids, gone)
        ids = np.concatenate([self.added_ids[keep], added_ids])
        matrix = np.concatenate([self.added_matrix[keep], np.asarray(added_matrix, np.float32).reshape(len(added_ids), self.matrix.shape[1])])
        order = np.argsort(ids, kind="stable")
        return dataclasses.replace(self, added_ids=ids[order], added_matrix=matrix[order], removed=removed,
                                   removed_count=0 if removed is None else int(removed.sum()),
                                   state=state, behind=False)

    def compacted(self, chunk: int = 50_000):
        """(ids, a function giving the float32 rows start:stop) of every live map in id order: a new base."""
        rows = np.flatnonzero(~self.removed) if self.removed_count else np.arange(len(self.ids))
        rows = np.concatenate([rows, len(self.ids) + np.arange(len(self.added_ids))])
        ids = self._ids_at(rows)
        order = np.argsort(ids, kind="stable")
        rows, ids = rows[order], ids[order]
        return ids, lambda start, stop: self._gather(rows[start:stop])

    # -- sidecar cache of the float32 vectors -----------------------------------------------------
    @classmethod
    def load(cls, folder: Path, **options) -> "VectorIndex":
        found = _read_cache(Path(folder))
        if found is None:
            raise FileNotFoundError(f"no mapclip index cache in {folder}")
        ids, matrix, state, scanner_file = found
        index = cls.build(ids, matrix, scanner_file=scanner_file, **options)
        index.state = state
        return index


# -- the state of a vector table ------------------------------------------------------------

def quick_state(conn, vector_table: str) -> tuple:
    """The cheap part of the state (two small reads and one b-tree descent): ``VectorState.quick()``."""
    version, rewrites = store.read_vector_counters(conn, vector_table)
    return (version, rewrites, store.read_vector_max_id(conn, vector_table))


def read_state(conn, vector_table: str) -> VectorState:
    """The whole state: the counters, and the rowids' count, largest and sum (a scan of the small
    rowids table, ~35 ms at 562,842 rows: run in the background)."""
    version, rewrites = store.read_vector_counters(conn, vector_table)
    count, max_id, id_sum = store.read_vector_id_stats(conn, vector_table)
    return VectorState(version, rewrites, max_id, count, id_sum)


def _read_ids(conn, vector_table: str, above: int | None = None) -> np.ndarray:
    return np.fromiter(store.iter_vector_ids(conn, vector_table, above), np.int64)


def _read_vectors_of(conn, vector_table: str, dim: int, map_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of these map ids (point lookups), leaving out ids that have none."""
    from ..store import vectors

    found, rows = [], []
    for map_id in np.asarray(map_ids, np.int64).tolist():
        blob = store.read_vector_blob(conn, vector_table, map_id)
        if blob is not None:
            found.append(map_id)
            rows.append(blob)
    if not rows:
        return _empty(dim)
    return np.array(found, np.int64), np.frombuffer(b"".join(rows), vectors.FLOAT32_LE).reshape(-1, dim).astype(np.float32)


# -- the cache ------------------------------------------------------------------------------

def cache_folder(db_path: str, vector_table: str, config: dict) -> Path:
    """The one cache folder of a (database file, vector table): ``index_dir`` or beside the file."""
    folder = Path(settings_of(config).index_dir or Path(db_path).parent)
    return folder / f"{Path(db_path).name}.{vector_table}.mapclip-index"


def remove_stale_caches(current: Path, keep_tag: str | None = None):
    """Delete what earlier states left: sibling folders of the earlier layout (one per state of the
    file: ``<db>.<table>.<fingerprint>.mapclip-index``), half-written files, and files of a base
    other than ``keep_tag``.  (A memory-mapped file deleted here stays readable until unmapped.)"""
    prefix = current.name[:-len(".mapclip-index")] if current.name.endswith(".mapclip-index") else current.name
    for folder in current.parent.glob(f"{glob.escape(prefix)}.*.mapclip-index*"):
        if folder != current:
            shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
    if keep_tag is not None and current.is_dir():
        for path in current.iterdir():
            if path.name != "current.json" and not path.name.startswith(keep_tag + "."):
                path.unlink(missing_ok=True)


def _save_cache(folder: Path, ids: np.ndarray, rows_between, state: VectorState | None, chunk: int | None = None) -> str:
    """Write a base (ids, and float32 rows from ``rows_between(start, stop)``) as the folder's
    current one; returns its tag.  The old base's files are removed after the switch."""
    folder.mkdir(parents=True, exist_ok=True)
    chunk = chunk or CACHE_CHUNK_ROWS
    tag = f"{time.time_ns():x}-{os.getpid()}"
    first = np.asarray(rows_between(0, min(chunk, len(ids))), np.float32)
    dim = first.shape[1] if first.ndim == 2 else 0
    np.save(folder / f"{tag}.ids.npy", np.asarray(ids, np.int64))
    partial = folder / f"{tag}.matrix.npy.tmp"
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(ids), dim))
    out[:len(first)] = first
    for start in range(len(first), len(ids), chunk):
        stop = min(start + chunk, len(ids))
        out[start:stop] = rows_between(start, stop)
    out.flush()
    del out
    os.replace(partial, folder / f"{tag}.matrix.npy")
    pointer = folder / f"current.json.{tag}.tmp"
    pointer.write_text(json.dumps({"format": CACHE_FORMAT, "tag": tag, "rows": int(len(ids)), "dim": int(dim),
                                   "state": None if state is None else state.as_list()}))
    os.replace(pointer, folder / "current.json")
    remove_stale_caches(folder, keep_tag=tag)
    return tag


def _read_cache(folder: Path):
    """(ids, memory-mapped matrix, state, file of its int8 codes) of the folder's current base, or None."""
    try:
        pointer = json.loads((folder / "current.json").read_text())
        if pointer.get("format") != CACHE_FORMAT:
            return None
        tag = pointer["tag"]
        ids = np.load(folder / f"{tag}.ids.npy")
        matrix = np.load(folder / f"{tag}.matrix.npy", mmap_mode="r")
        state = VectorState(*pointer["state"]) if pointer.get("state") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(ids) != len(matrix) or len(ids) != pointer.get("rows"):
        return None
    return ids, matrix, state, folder / f"{tag}.int8.faiss"


def _options(config: dict) -> dict:
    settings = settings_of(config)
    return {"int8_min_rows": settings.int8_min_rows, "rerank": settings.rerank,
            "scan_threads": min(settings.scan_threads, os.cpu_count() or 1),
            "fast_candidates": settings.fast_candidates}


def _new_base(db_path: str, model: dict, config: dict, ids: np.ndarray, rows_between, matrix,
              state: VectorState) -> VectorIndex:
    """An index of a new base; through the cache (written, then memory-mapped) when it is big enough."""
    options = _options(config)
    if len(ids) >= options["int8_min_rows"]:  # small collections reread in milliseconds: no file
        folder = cache_folder(db_path, model.vector_table, config)
        try:
            _save_cache(folder, ids, rows_between, state)
            found = _read_cache(folder)
            if found is not None:
                ids, matrix, _, options["scanner_file"] = found  # memory-mapped: the page cache holds it
        except OSError as error:
            log.warning("mapclip: cannot cache the index at %s (%s); it is rebuilt at each start", folder, error)
    if matrix is None:
        matrix = np.concatenate([rows_between(start, min(start + 50_000, len(ids)))
                                 for start in range(0, len(ids), 50_000)]) if len(ids) else _empty(int(model.dim))[1]
    index = VectorIndex.build(ids, matrix, **options)
    index.state = state
    return index


def _cached_vectors(conn, db_path: str, model: dict, config: dict):
    """(ids, memory-mapped matrix, state, file of the int8 codes) of the cached base, if it is one of
    this database's earlier states (checked on sample vectors), else None."""
    found = _read_cache(cache_folder(db_path, model.vector_table, config))
    if found is None:
        return None
    ids, matrix, state, scanner_file = found
    if state is None or matrix.shape[1] != int(model.dim) or not len(ids):
        return None
    sample = np.unique(np.linspace(0, len(ids) - 1, min(16, len(ids))).astype(np.int64))
    stored_ids, stored = _read_vectors_of(conn, model.vector_table, int(model.dim), ids[sample])
    rows = sample[np.isin(ids[sample], stored_ids)]
    if not len(rows) or not np.array_equal(np.asarray(matrix[rows]), stored):
        return None  # another database under the same name
    return found


def _cached_base(conn, db_path: str, model: dict, config: dict) -> VectorIndex | None:
    """The cached base, if it is one of this database's earlier states."""
    found = _cached_vectors(conn, db_path, model, config)
    if found is None:
        return None
    ids, matrix, state, scanner_file = found
    index = VectorIndex.build(ids, matrix, scanner_file=scanner_file, **_options(config))
    index.state = state
    return index


def provisional_index(db_path: str, model: dict, config: dict) -> VectorIndex | None:
    """An exact index over the cached float32 vectors, ready in milliseconds after a restart: it
    answers while the int8 codes are read back (~1 s at 562,842 maps), a full scan of the page
    cache per query (~0.1 s there) instead of sqlite-vec's (~0.6 s).  Only when the cache holds the
    file's current vectors; None otherwise (the database answers until the index is ready)."""
    from ..store import connect

    conn = connect(db_path)
    try:
        conn.execute("BEGIN")
        found = _cached_vectors(conn, db_path, model, config)
        if found is None or found[2] != read_state(conn, model.vector_table):
            return None
    finally:
        conn.close()
    ids, matrix, state, _ = found
    return VectorIndex(ids, matrix, None, state=state, provisional=True)


def _follow(conn, vector_table: str, dim: int, index: VectorIndex, state: VectorState,
            limit: int) -> VectorIndex | None:
    """``index`` brought to ``state`` by reading only what changed; None when more than ``limit``
    maps were added, or vectors were rewritten in place (a rebuild is then due)."""
    old = index.state
    if old is None or state.rewrites != old.rewrites or state.version < old.version:
        return None
    above = _read_ids(conn, vector_table, above=old.max_id)
    if old.count is not None and state.count == old.count + len(above) and state.id_sum == old.id_sum + float(above.sum()):
        added, removed = above, np.zeros(0, np.int64)  # appended only (the usual case)
    else:  # deletions, or writes below the largest id made outside MapStore: compare every id
        current, live = _read_ids(conn, vector_table), index.live_ids()
        added, removed = np.setdiff1d(current, live, assume_unique=True), np.setdiff1d(live, current, assume_unique=True)
    if len(added) > limit:
        return None
    added, matrix = _read_vectors_of(conn, vector_table, dim, added)
    return index.with_changes(added, matrix, removed, state)


def catch_up(db_path: str, model: dict, config: dict, index: VectorIndex | None = None) -> VectorIndex:
    """An index holding the database's current vectors: ``index`` itself when nothing changed, else
    ``index`` (or the cached base) plus what changed, compacted when that grew large; a base built
    from the database only when no earlier one can be followed."""
    from ..store import connect, read_vectors

    table, dim = model.vector_table, int(model.dim)
    if index is not None and index.provisional:
        index = None  # the real base is loaded from the same cache
    conn = connect(db_path)
    try:
        conn.execute("BEGIN")  # one read snapshot: the state and the vectors read agree
        state = read_state(conn, table)
        if index is not None and index.state == state:
            return index
        if index is None:
            index = _cached_base(conn, db_path, model, config)
        if index is not None:
            base = len(index.ids)
            limit = settings_of(config).index_delta_rows or int(max(DELTA_ROWS, DELTA_SHARE * base))
            # past half the base, one sequential read of every vector beats that many lookups
            followed = _follow(conn, table, dim, index, state, max(limit, base // 2))
            if followed is not None:
                removed_limit = settings_of(config).index_removed_rows
                if len(followed.added_ids) <= limit and followed.removed_count <= removed_limit:
                    return followed
                ids, rows_between = followed.compacted()
                log.info("mapclip: compacting the index of %s (%d added, %d deleted)", table,
                         len(followed.added_ids), followed.removed_count)
                return _new_base(db_path, model, config, ids, rows_between, None, state)
        if state.count is not None and state.count >= _options(config)["int8_min_rows"]:
            # Big enough for the cache: the vectors stream from SQLite into the memory-mapped cache
            # file, never a second float32 copy in the server's own memory (1.15 GB at 562,842).
            ids = _read_ids(conn, table)
            try:
                return _new_base(db_path, model, config, ids, _RowsInOrder(conn, table, dim, ids), None, state)
            except _NotInOrder:
                log.info("mapclip: %s does not list its vectors in map id order; reading them sorted", table)
        ids, matrix = read_vectors(conn, table, dim)
        return _new_base(db_path, model, config, ids, lambda start, stop: matrix[start:stop], matrix, state)
    finally:
        conn.close()


class _NotInOrder(RuntimeError):
    pass


class _RowsInOrder:
    """``rows_between(start, stop)`` over one read of a vec0 table, which lists its rows in map id
    order (its chunks fill in rowid order): the rows of ``ids`` (read in the same snapshot), asked
    for in order; asking for earlier rows starts the read again.  No ``ORDER BY``: SQLite would sort
    every vector in a temporary b-tree first, in the server's own memory (1.16 GB at 562,842)."""

    def __init__(self, conn, vector_table: str, dim: int, ids: np.ndarray):
        self.conn, self.vector_table, self.dim, self.ids = conn, vector_table, dim, ids
        self.cursor, self.position = None, 0

    def __call__(self, start: int, stop: int) -> np.ndarray:
        from ..store import vectors

        if self.cursor is None or start < self.position:
            self.cursor, self.position = store.scan_vectors(self.conn, self.vector_table), 0
        while self.position < start:
            self.position += len(self.cursor.fetchmany(min(20_000, start - self.position)) or [0] * (start - self.position))
        rows = self.cursor.fetchmany(stop - start)
        self.position += len(rows)
        if len(rows) != stop - start or [r[0] for r in rows] != self.ids[start:stop].tolist():
            raise _NotInOrder(f"rows {start}-{stop} are not the ids expected there")
        return np.frombuffer(b"".join(r[1] for r in rows), vectors.FLOAT32_LE).reshape(-1, self.dim)


def build_for(db_path: str, model: dict, config: dict) -> VectorIndex:
    """Index a model's vectors as they are now, through the sidecar cache (loaded and followed when
    it holds an earlier state of the same table, else written afresh)."""
    return catch_up(db_path, model, config, None)


# -- serving: one live index per (database, vector table) ----------------------------------

def _file_stat(db_path: str) -> tuple:
    parts = []
    for path in (db_path, db_path + "-wal"):
        try:
            stat = os.stat(path)
            parts += [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        except OSError:
            parts.append(None)
    return tuple(parts)


class LiveIndex:
    """The index of one (database file, vector table), kept up to date in a background thread.

    ``current()`` (each search) returns at once: the newest index, marked ``behind`` when the
    database already holds vector changes it lacks, or None before the first index exists."""

    def __init__(self, db_path: str, model: dict, config: dict):
        self.db_path, self.model, self.config = db_path, ModelRow.from_row(model), dict(config)
        self.settings = settings_of(config)
        self.lock = threading.Lock()
        self.index: VectorIndex | None = None
        self.latest: tuple | None = None    # the newest quick state seen
        self.file_stat = None
        self.checked_at = self.quick_read_at = self.verified_at = self.failed_at = -float("inf")
        self.verify_due = True
        self.unverified_since: float | None = None  # when a file change not yet checked in full was seen
        self.worker: threading.Thread | None = None
        self.conn = None
        self.builds = 0  # catch-ups that produced a new index (for tests and benchmarks)
        self._behind: tuple | None = None
        self.early_done = threading.Event()  # the exact index of a restart's cache: published, or none
        # At start-up: work (a future) the codes' loading waits for while the cache's exact index
        # answers, so that the two do not share the cores (``defer_codes_until``)
        self.defer = None

    def _setting(self, name: str) -> float:
        return float(self.settings[name])

    def _quick(self):
        """The quick state through a read-only connection of our own (None if it cannot be read)."""
        try:
            if self.conn is None:
                import sqlite3

                uri = "file:" + urllib.parse.quote(os.path.abspath(self.db_path)) + "?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=0.05)
            return quick_state(self.conn, self.model.vector_table)
        except Exception as error:
            log.debug("mapclip: cannot check %s: %s", self.db_path, error)
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None

    def _full(self) -> VectorState | None:
        """The whole state through our own connection (None if it cannot be read)."""
        if self._quick() is None:  # opens the connection, or says it cannot
            return None
        try:
            return read_state(self.conn, self.model.vector_table)
        except Exception as error:
            log.debug("mapclip: cannot check %s: %s", self.db_path, error)
            return None

    def current(self) -> VectorIndex | None:
        """Runs SQLite (off the event loop: search.py calls it in a thread)."""
        now = time.monotonic()
        with self.lock:
            if now - self.checked_at >= self._setting("index_check_interval"):
                self.checked_at = now
                stat = _file_stat(self.db_path)
                # the file's size and times gate the SQL check; a slow re-check covers a write the
                # file's timestamps could not tell apart
                changed = stat != self.file_stat
                if changed or now - self.quick_read_at >= 5.0:
                    self.file_stat = stat
                    self.quick_read_at = now
                    quick = self._quick()
                    if quick is not None:
                        self.latest = quick
                    if changed and self.file_stat is not None:
                        # A write the quick state cannot see (plain SQL that skipped the store's
                        # counters, below the largest id) is unverified until the whole state is read.
                        self.unverified_since = now
            index = self.index
            lagging = index is not None and self.latest is not None and index.state is not None \
                and self.latest != index.state.quick()
            if not lagging and index is not None and index.state is not None and self.unverified_since is not None:
                if now - self.verified_at >= self._setting("index_verify_interval"):
                    # ~35 ms at 562,842 rows, at most once a verify interval, only after a write
                    self.verified_at = now
                    full = self._full()
                    if full is not None and full == index.state:
                        self.unverified_since = None  # a catalogue edit: nothing for the index
                    else:
                        lagging = self.verify_due = True
                else:
                    lagging = self.verify_due = True  # said behind until it is checked
            if index is None or lagging or self.verify_due:
                self._start_locked(now)
            if index is None or not lagging:
                return index
            if self._behind is None or self._behind[0] is not index:
                self._behind = (index, dataclasses.replace(index, behind=True))
            return self._behind[1]

    def defer_codes_until(self, work):
        """At start-up, load the int8 and fast-scan codes only once ``work`` (a future: the model's
        loading) is done, or ``DEFER_LIMIT`` has passed, and only while a restart's exact index from
        the cache answers: loading both at once slowed the model's by ~0.4 s (562,842 maps), and the
        first text search waits for the model.  Call before the first ``current()``."""
        with self.lock:
            if self.worker is None and self.index is None and self.builds == 0:
                self.defer = work

    def current_or_early(self, timeout: float = EARLY_WAIT) -> VectorIndex | None:
        """``current()``, but at start-up, while the cache is checked for a restart's exact index,
        wait for that (a few hundred ms at most) rather than answer None, which sends the search to
        sqlite-vec (0.6 s at 562,842 maps, or its time limit's 503).  Runs off the event loop."""
        index = self.current()
        if index is None and not self.early_done.is_set():
            self.early_done.wait(timeout)
            index = self.current()
        return index

    def _start_locked(self, now: float):
        if self.worker is not None or now - self.failed_at < RETRY_AFTER:
            return
        self.worker = threading.Thread(target=self._work, daemon=True, name="mapclip-index")
        self.worker.start()

    def _work(self):
        try:
            try:
                if self.index is None and self.builds == 0:
                    self._publish_provisional()
            finally:
                self.early_done.set()
            defer, self.defer = self.defer, None
            if defer is not None and self.index is not None and self.index.provisional:
                concurrent.futures.wait([defer], timeout=DEFER_LIMIT)
            while True:
                started = time.perf_counter()
                with self.lock:
                    index, self.verify_due = self.index, False
                    verify_started = time.monotonic()
                try:
                    new = catch_up(self.db_path, self.model, self.config, index)
                except Exception:  # the SQL path (or the previous index) still answers
                    log.exception("mapclip: updating the vector index of %s failed; it is retried later", self.db_path)
                    with self.lock:
                        self.failed_at = time.monotonic()
                    return
                new = self._with_fast_scan(new)
                with self.lock:
                    if new is not index:
                        self.builds += 1
                        log.info("mapclip: index of %s %s ready (%d vectors, %d changes since its base, %.2f s)",
                                 self.db_path, self.model.vector_table, len(new), new.changes,
                                 time.perf_counter() - started)
                    self.index = new
                    self.verified_at = verify_started
                    if self.unverified_since is not None and verify_started >= self.unverified_since:
                        self.unverified_since = None  # catch_up read the whole state after that change
                    quick = self._quick()
                    if quick is not None:
                        self.latest = quick
                    if self.latest is None or new.state is None or self.latest == new.state.quick():
                        if not self.verify_due:
                            return
                time.sleep(0.2)  # let a burst of writes settle before the next read
        finally:
            with self.lock:
                self.worker = None

    def _with_fast_scan(self, new: VectorIndex) -> VectorIndex:
        """``new`` with fast-scan codes when its base is big enough: read from the cache at once, or
        built (seconds) while ``new`` already serves; a failure leaves the int8 codes serving."""
        if (new.scanner is None or new.fast is not None or len(new.ids) < self.settings.fast_scan_min_rows
                or not FastScanner.fits(new.matrix.shape[1])):
            return new
        cached = new.fast_file is not None and new.fast_file.is_file()
        if not cached:
            with self.lock:
                self.index = new  # serve the int8 index while the fast-scan codes are built
        try:
            return new.with_fast_scan()
        except Exception:
            log.exception("mapclip: building the fast-scan codes of %s failed; int8 codes serve", self.db_path)
            return new

    def _publish_provisional(self):
        """After a restart, the cached vectors answer exactly at once, while the real index loads."""
        try:
            early = provisional_index(self.db_path, self.model, self.config)
        except Exception as error:  # the real build reports what is wrong
            log.debug("mapclip: no provisional index for %s: %s", self.db_path, error)
            return
        if early is not None:
            with self.lock:
                if self.index is None:
                    self.index = early

    def wait(self, timeout: float = 30.0) -> bool:
        """Until no update is under way (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker = self.worker
            if worker is None:
                return True
            worker.join(0.05)
        return False

    def close(self):
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


class IndexRegistry:
    """One live index per (database file, vector table, index options), kept up to date in the background.

    A server holds one registry (the plugin's state).  Until the first index is ready ``for_model``
    answers None and searches use sqlite-vec; after that it always answers an index, the previous
    one (marked ``behind``) while a newer one is read."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live: dict[tuple, LiveIndex] = {}

    @staticmethod
    def key(db_path: str, model: dict, config: dict) -> tuple:
        settings = settings_of(config)
        return (os.path.abspath(db_path), model.vector_table, settings.int8_min_rows, settings.rerank,
                settings.scan_threads, settings.fast_scan_min_rows, settings.fast_candidates)

    @property
    def indexes(self) -> dict:
        return {key: live.index for key, live in list(self.live.items()) if live.index is not None}

    def live_for(self, db_path: str, model: dict, config: dict) -> LiveIndex:
        key = self.key(db_path, model, config)
        with self.lock:
            live = self.live.get(key)
            if live is None:
                live = self.live[key] = LiveIndex(db_path, model, config)
        return live

    def for_model(self, db_path: str | None, model: dict, config: dict, *, wait_early: bool = False) -> VectorIndex | None:
        """The newest index of this model's vectors, or None before the first one is ready (or when off).
        ``wait_early``: at start-up, wait for a restart's exact index from the cache (blocks: never
        on the event loop)."""
        if not db_path or settings_of(config).index == "off":
            return None
        live = self.live_for(db_path, model, config)
        return live.current_or_early() if wait_early else live.current()
