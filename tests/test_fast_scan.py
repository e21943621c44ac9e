"""Fast-scan codes: the first stage of an unfiltered search of a large collection (4-bit product
quantiser, faiss fast scan), narrowed by the int8 codes and re-scored exactly.  Answers stay the
exact ones where the true best maps are among the candidates; filtered searches keep the int8
scan; the codes are built while the int8 index serves and read back from the cache after a restart."""

import asyncio
import shutil

import numpy as np
import pytest
from test_index_updates import serve
from test_plugin import wait_for_index

from conftest import load_collection
from datasette_mapclip.search import index as index_module
from datasette_mapclip.search.index import FastScanner, Int8Scanner, VectorIndex
from datasette_mapclip.store import MapStore
from datasette_mapclip.web.state import collections_of, state_for


def clustered(rows, dim=64, clusters=300, seed=0):
    """Unit vectors in clusters (as CLIP image vectors are), and queries apart from them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    matrix = centres[rng.integers(0, clusters, rows)] + 0.6 * rng.standard_normal((rows, dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = centres[rng.integers(0, clusters, 40)] + 0.9 * rng.standard_normal((40, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return matrix, queries


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    matrix, queries = clustered(30_000)
    ids = np.arange(1, len(matrix) + 1, dtype=np.int64) * 3  # ids are not rows
    folder = tmp_path_factory.mktemp("cache")
    index = VectorIndex.build(ids, matrix, int8_min_rows=1000, rerank=64, scanner_file=folder / "t.int8.faiss",
                              scan_threads=2, fast_candidates=400)
    return ids, matrix, queries, index, folder


def exact_top(ids, matrix, query, k):
    scores = matrix @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def test_fast_scan_answers_the_exact_best_maps_with_exact_similarities(big, monkeypatch):
    ids, matrix, queries, index, _ = big
    fast = index.with_fast_scan()
    assert index.fast is None and fast.fast is not None  # a new index sharing the base
    assert fast.matrix is index.matrix and fast.scanner is index.scanner
    assert [first for first, _ in fast.fast.parts] == [0, 15_000]  # split as the int8 codes are
    int8_scans = []
    monkeypatch.setattr(Int8Scanner, "candidates", lambda *a, **k: int8_scans.append(1) or (_ for _ in ()).throw(
        AssertionError("the int8 scan ran")))
    found = 0
    for query in queries:
        got_ids, got_scores = fast.search(query, 10)
        want_ids, want_scores = exact_top(ids, matrix, query, 10)
        found += len(set(got_ids.tolist()) & set(want_ids.tolist()))
        # every similarity is the exact float32 one of the map it names
        rows = np.searchsorted(ids, got_ids)
        np.testing.assert_allclose(got_scores, matrix[rows] @ query, rtol=1e-5, atol=1e-6)
        assert list(got_scores) == sorted(got_scores, reverse=True)
    assert not int8_scans
    assert found / (10 * len(queries)) >= 0.98
    assert fast.scan_name(11) == "in-memory fast-scan + exact re-scoring"


def test_fast_scan_beats_its_own_coarse_order(big):
    """The int8 narrowing and the float32 re-scoring matter: the fast-scan codes' own order alone
    misses exact answers that the search finds (so a search that skipped them would fail above)."""
    ids, matrix, queries, index, _ = big
    fast = index.with_fast_scan()
    coarse_hits = 0
    for query in queries:
        scores = np.concatenate([part.search(query[None], 10)[0][0] for _, part in fast.fast.parts])
        rows = np.concatenate([part.search(query[None], 10)[1][0] + first for first, part in fast.fast.parts])
        coarse = ids[rows[np.argsort(-scores)[:10]]]
        coarse_hits += len(set(coarse.tolist()) & set(exact_top(ids, matrix, query, 10)[0].tolist()))
    assert coarse_hits / (10 * len(queries)) < 0.95


def test_long_lists_and_filters_keep_the_int8_scan(big, monkeypatch):
    ids, matrix, queries, index, _ = big
    fast = index.with_fast_scan()
    assert fast.uses_fast_scan(50) and not fast.uses_fast_scan(51)  # 8 x k within the 400 candidates
    assert fast.scan_name(51) == fast.scan_name(None) == "in-memory int8 + exact re-scoring"
    monkeypatch.setattr(FastScanner, "candidates", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the fast scan ran for a long list")))
    got, _ = fast.search(queries[0], 200)
    assert len(set(got.tolist()) & set(exact_top(ids, matrix, queries[0], 200)[0].tolist())) >= 190
    allowed = ids[::7]
    got, _ = fast.search_among(queries[1], 10, allowed, exact_up_to=100)
    sub = np.isin(ids, allowed)
    assert got.tolist() == exact_top(ids[sub], matrix[sub], queries[1], 10)[0].tolist()


def test_deleted_maps_are_never_answered_by_the_fast_scan(big):
    ids, matrix, queries, index, _ = big
    fast = index.with_fast_scan()
    best = exact_top(ids, matrix, queries[2], 5)[0]
    changed = fast.with_changes(np.zeros(0, np.int64), np.zeros((0, matrix.shape[1]), np.float32), best[:3], None)
    assert changed.fast is fast.fast
    got, _ = changed.search(queries[2], 10)
    assert not set(best[:3].tolist()) & set(got.tolist())
    assert set(best[3:].tolist()) <= set(got.tolist())


def test_fast_scan_codes_are_cached_and_a_bad_file_is_rebuilt(big, monkeypatch):
    ids, matrix, queries, index, folder = big
    index.with_fast_scan()
    cached = folder / "t.pq4fs.npz"
    assert cached.is_file()
    trained = []
    real_init = FastScanner.__init__

    def counting(self, matrix_, *args, **kwargs):
        if matrix_ is not None:
            trained.append(1)
        real_init(self, matrix_, *args, **kwargs)

    monkeypatch.setattr(FastScanner, "__init__", counting)
    again = VectorIndex.build(ids, matrix, int8_min_rows=1000, rerank=64, scanner_file=folder / "t.int8.faiss",
                              scan_threads=2, fast_candidates=400)
    assert again.fast is not None and not trained  # read back, not trained again
    np.testing.assert_array_equal(again.search(queries[3], 10)[0], index.with_fast_scan().search(queries[3], 10)[0])
    # codes of another collection, or a damaged file: ignored, built again
    assert FastScanner.load(cached, len(ids) + 1, matrix.shape[1]) is None
    assert FastScanner.load(cached, len(ids), matrix.shape[1] * 2) is None
    cached.write_bytes(cached.read_bytes()[:1000])
    rebuilt = VectorIndex.build(ids, matrix, int8_min_rows=1000, rerank=64, scanner_file=folder / "t.int8.faiss",
                                scan_threads=2, fast_candidates=400)
    assert rebuilt.fast is None
    assert rebuilt.with_fast_scan().fast is not None and trained == [1]


# -- served ------------------------------------------------------------------------------------

# fast-scan codes from 10 maps; 100 candidates (every map of this small collection, so its answers
# must equal sqlite-vec's exactly)
FAST = {"int8_min_rows": 10, "fast_scan_min_rows": 10, "fast_candidates": 100}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 30)


async def fast_index(ds):
    collection = await collections_of(ds).open(None, "maps")
    for _ in range(300):
        found = collection.index()
        if found is not None and found.fast is not None:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("the fast-scan codes were never built")


@pytest.mark.asyncio
async def test_a_server_builds_fast_scan_codes_and_answers_as_sqlite_vec(collection, tmp_path):
    path = tmp_path / "maps.db"
    shutil.copy(collection[0], path)
    ds = serve(path, **FAST)
    await fast_index(ds)
    plain = serve(path, index="off")
    store = MapStore(path)
    titles = [row[0] for row in store.conn.execute("SELECT title FROM maps ORDER BY id LIMIT 3")]
    store.close()
    for text in titles:
        quick = (await ds.client.get("/-/mapclip/search.json", params={"q": text, "k": 5})).json()
        slow = (await plain.client.get("/-/mapclip/search.json", params={"q": text, "k": 5})).json()
        assert quick["searched_with"] == "in-memory fast-scan + exact re-scoring"
        assert [r["id"] for r in quick["results"]] == [r["id"] for r in slow["results"]]
        np.testing.assert_allclose([r["similarity"] for r in quick["results"]],
                                   [r["similarity"] for r in slow["results"]], atol=1e-3)
    filtered = (await ds.client.get("/-/mapclip/search.json", params={"q": titles[0], "year_from": 1})).json()
    assert filtered["searched_with"].startswith("in-memory int8 + exact re-scoring")
    # a restart reads the codes back: fast scan from its first real index, nothing trained
    cached = list(tmp_path.glob("*.mapclip-index/*.pq4fs.npz"))
    assert len(cached) == 1
    restarted = serve(path, **FAST)
    first = await wait_for_index(restarted)
    assert first.fast is not None


@pytest.mark.asyncio
async def test_small_collections_get_no_fast_scan_codes(collection, tmp_path):
    path = tmp_path / "maps.db"
    shutil.copy(collection[0], path)
    ds = serve(path, int8_min_rows=10)  # fast_scan_min_rows stays 100,000
    index = await wait_for_index(ds)
    live = state_for(ds).indexes
    for each in live.live.values():
        each.wait()
    assert index.fast is None and (await collections_of(ds).open(None, "maps")).index().fast is None
    assert not list(tmp_path.glob("*.mapclip-index/*.pq4fs.npz"))
    assert index_module.DECLARED["fast_scan_min_rows"].default == 100_000
