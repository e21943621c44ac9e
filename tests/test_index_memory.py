"""A large collection's float32 vectors stay out of the server's resident memory: searches scan
the int8 codes and read back only their candidates' rows, whose pages are dropped again, so the
process holds the codes and the model while the vectors sit in the shared page cache."""

from __future__ import annotations

import numpy as np

from datasette_mapclip.search.index import VectorIndex, _save_cache


def mapping_rss_kb(path) -> int:
    """Resident kB of this process's mappings of one file (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_searches_keep_the_float32_vectors_out_of_resident_memory(tmp_path):
    rng = np.random.default_rng(7)
    rows, dim = 60_000, 128
    matrix = rng.standard_normal((rows, dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.arange(1, rows + 1, dtype=np.int64)
    tag = _save_cache(tmp_path, ids, lambda start, stop: matrix[start:stop], None)
    index = VectorIndex.load(tmp_path, int8_min_rows=1000)
    mapped = tmp_path / f"{tag}.matrix.npy"
    size_kb = mapped.stat().st_size // 1024
    assert not index.exact
    assert mapping_rss_kb(mapped) < size_kb // 10  # building read every row, and let them go
    queries = rng.standard_normal((300, dim)).astype(np.float32)
    for query in queries:
        query /= np.linalg.norm(query)
        found, _ = index.search(query, 10)
        assert list(found) == list(ids[np.argsort(-(matrix @ query))[:10]])  # still exact at the top
    index.search_among(queries[0], 10, ids[::7])  # an exactly scored filter reads ~8,600 rows
    index.vector_of(123)
    # 300 searches re-scored 256 candidates each: without dropping the pages again, fault-around
    # would have mapped most of the file back by now
    assert mapping_rss_kb(mapped) < size_kb // 10, (mapping_rss_kb(mapped), size_kb)


def test_a_scan_split_across_threads_finds_what_one_scan_finds():
    """``scan_threads`` splits the int8 codes into parts scanned side by side: the merged candidates
    are the single scan's, with and without a filter's mask, and searches rank as before."""
    import threading

    rng = np.random.default_rng(11)
    rows, dim = 9_001, 64  # parts of unequal size
    matrix = rng.standard_normal((rows, dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.arange(1, rows + 1, dtype=np.int64)
    whole = VectorIndex.build(ids, matrix, int8_min_rows=1000, scan_threads=1)
    split = VectorIndex.build(ids, matrix, int8_min_rows=1000, scan_threads=3)
    assert [start for start, _ in split.scanner.parts] == [0, 3000, 6000]
    allowed = rng.random(rows) < 0.3
    scanned_in = set()
    for query in rng.standard_normal((20, dim)).astype(np.float32):
        query /= np.linalg.norm(query)
        one = whole.scanner.candidates(query, 200)
        assert sorted(split.scanner.candidates(query, 200)) == sorted(one)
        masked = split.scanner.candidates(query, 200, allowed)
        assert allowed[masked].all() and sorted(masked) == sorted(whole.scanner.candidates(query, 200, allowed))
        assert list(split.search(query, 10)[0]) == list(whole.search(query, 10)[0])
        scanned_in.update(t.name.split("_")[0] for t in threading.enumerate())
    assert "mapclip-scan" in scanned_in  # the other parts were scanned in the index's own threads
