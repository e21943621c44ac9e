"""The in-memory index of a collection that changes while it is served (Datasette's mutable mode):
catalogue edits leave it alone, new maps join it without a rebuild, deleted maps leave it, the
previous index answers (saying so) while a newer one is read, and one cache stays on disk."""

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest
from test_plugin import wait_for_index

from conftest import load_collection, make_datasette, open_db
from datasette_mapclip.search import index as index_module
from datasette_mapclip.store import MapStore, vectors
from datasette_mapclip.store.records import MapRecord
from datasette_mapclip.web.state import collections_of, state_for

# int8 scan from 10 maps (so the cache is written), and every search checks the database.
LIVE = {"int8_min_rows": 10, "index_check_interval": 0, "index_verify_interval": 0}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 30)


@pytest.fixture
def copy(collection, tmp_path):
    path = tmp_path / "maps.db"
    shutil.copy(collection[0], path)
    return path


def serve(path, **config):
    return make_datasette([str(path)], metadata={"plugins": {"datasette-mapclip": config}})


async def live_of(ds):
    collection = await collections_of(ds).open(None, "maps")
    return state_for(ds).indexes.live_for(collection.db.path, collection.model, collection.config), collection


async def caught_up(ds, predicate=lambda index: True, timeout=15.0):
    """The index once the server has read every change (and ``predicate`` holds)."""
    live, collection = await live_of(ds)
    for _ in range(int(timeout / 0.05)):
        found = collection.index()
        if found is not None and not found.behind and live.worker is None and predicate(found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("the index never caught up")


def cache_files(path):
    """Every index cache beside the database: {folder: {file: (size, mtime)}}."""
    return {folder.name: {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()}
            for folder in path.parent.iterdir() if ".mapclip-index" in folder.name}


def add_maps(path, vectors_to_add, first=1000):
    """New maps with their vectors, written as the loaders write them; returns their ids."""
    store = MapStore(path)
    model = store.model()
    records = [MapRecord(source_id=f"new:{first + i}", location=f"/new/{first + i}.jpg", source="test",
                         title=f"New map {first + i}") for i in range(len(vectors_to_add))]
    store.write_batch(model, records, np.asarray(vectors_to_add, np.float32))
    ids = [store.conn.execute("SELECT id FROM maps WHERE source_id = ?", (r.source_id,)).fetchone()[0] for r in records]
    store.close()
    return ids


def stored_vectors(path):
    store = MapStore(path)
    ids, matrix = store.vectors()
    store.close()
    return dict(zip(ids.tolist(), matrix))


def near(vector, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    return vectors.normalise(vector + noise * rng.standard_normal(vector.shape)).astype(np.float32)


async def same_as_sqlite_vec(ds, path, query):
    plain = serve(path, index="off")
    slow = (await plain.client.get(f"/-/mapclip/search.json?{query}")).json()
    quick = (await ds.client.get(f"/-/mapclip/search.json?{query}")).json()
    assert slow["searched_with"] == "sqlite-vec"
    assert quick["searched_with"].startswith("in-memory int8"), quick
    assert [r["id"] for r in quick["results"]] == [r["id"] for r in slow["results"]], query
    np.testing.assert_allclose([r["similarity"] for r in quick["results"]],
                               [r["similarity"] for r in slow["results"]], atol=1e-3)
    return quick


@pytest.mark.asyncio
async def test_a_title_edit_leaves_the_index_and_its_cache_alone(copy):
    ds = serve(copy, **LIVE)
    first = await wait_for_index(ds)
    first = await caught_up(ds)
    live, _ = await live_of(ds)
    builds, cache = live.builds, cache_files(copy)
    assert len(cache) == 1
    for step in range(3):  # edits through Datasette's kind of connection, one after another
        conn = open_db(copy)
        conn.execute("UPDATE maps SET title = ? WHERE id = 3", (f"Renamed {step}",))
        conn.close()
        response = (await ds.client.get("/-/mapclip/search.json?like=3&k=5")).json()
        assert "index_behind" not in response, response
        assert response["results"][0]["title"] == f"Renamed {step}"  # the catalogue is read live
        assert live.wait()
    assert await caught_up(ds) is first  # the same index object, holding the same state
    assert first.state == index_module.read_state(open_db(copy), first_table(copy))
    assert live.builds == builds
    assert cache_files(copy) == cache


def first_table(path):
    store = MapStore(path)
    table = store.model()["vector_table"]
    store.close()
    return table


@pytest.mark.asyncio
async def test_new_maps_join_the_live_index_without_a_rebuild(copy):
    ds = serve(copy, **LIVE)
    await wait_for_index(ds)
    first = await caught_up(ds)
    cache = cache_files(copy)
    old = stored_vectors(copy)
    # near maps 5 and 12, so the existing maps' neighbours change too
    new_ids = add_maps(copy, [near(old[5], 1, 0.001), near(old[12], 2), near(old[12], 3)])
    found = await caught_up(ds, lambda index: all(index.row_of(i) is not None for i in new_ids), timeout=10)
    assert found is not first and len(found) == 33
    assert found.matrix is first.matrix and found.scanner is first.scanner  # the base is shared, not rebuilt
    assert cache_files(copy) == cache  # nor is the cache rewritten
    for map_id in new_ids:
        data = await same_as_sqlite_vec(ds, copy, f"like={map_id}&k=7")
        assert data["results"][0]["id"] == map_id
    assert new_ids[0] in [r["id"] for r in (await same_as_sqlite_vec(ds, copy, "like=5&k=3"))["results"]]
    await same_as_sqlite_vec(ds, copy, "q=relief+map&k=10")
    await same_as_sqlite_vec(ds, copy, "like=12&k=4&year_min=1805")  # filtered: the added maps have no year
    # a restart loads the cached base and reads only the new maps again: the cache stays as it was
    again = serve(copy, **LIVE)
    await wait_for_index(again)
    restarted = await caught_up(again)
    assert len(restarted) == 33 and len(restarted.added_ids) == 3
    assert cache_files(copy) == cache


@pytest.mark.asyncio
async def test_deleted_maps_leave_the_live_index(copy):
    ds = serve(copy, **LIVE)
    await wait_for_index(ds)
    first = await caught_up(ds)
    store = MapStore(copy)
    assert store.delete_vectors(store.model(), [7]) == 1
    store.close()
    found = await caught_up(ds, lambda index: index.row_of(7) is None)
    assert found.matrix is first.matrix and len(found) == 29
    missing = await ds.client.get("/-/mapclip/search.json?like=7")
    assert missing.status_code == 404
    data = await same_as_sqlite_vec(ds, copy, "like=8&k=30")
    assert 7 not in [r["id"] for r in data["results"]] and len(data["results"]) == 29
    # a delete made outside the store (no counter bumped) is found by the rowids' count and sum
    conn = open_db(copy)
    conn.execute(f"DELETE FROM [{first_table(copy)}] WHERE map_id = 9")
    conn.close()
    await caught_up(ds, lambda index: index.row_of(9) is None)
    data = await same_as_sqlite_vec(ds, copy, "like=8&k=30")
    assert {7, 9}.isdisjoint(r["id"] for r in data["results"]) and len(data["results"]) == 28
    await same_as_sqlite_vec(ds, copy, "q=roads&k=5&year_min=1800")


def hold_catch_up(monkeypatch) -> threading.Event:
    """Every catch-up of the live index waits until the returned gate is set (a large collection's
    read, stood in for)."""
    gate = threading.Event()
    real = index_module.catch_up

    def slow_catch_up(*args, **kwargs):
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "catch_up", slow_catch_up)
    return gate


@pytest.mark.asyncio
async def test_while_catching_up_the_previous_index_answers_and_says_so(copy, monkeypatch):
    ds = serve(copy, **LIVE)
    await wait_for_index(ds)
    first = await caught_up(ds)
    gate = hold_catch_up(monkeypatch)
    old = stored_vectors(copy)
    [new_id] = add_maps(copy, [near(old[4], 4, noise=0.001)])
    try:
        for query in (f"like={new_id}&k=5", "like=4&k=5", "q=relief&k=5", "like=4&k=5&year_min=1810"):
            response = await ds.client.get(f"/-/mapclip/search.json?{query}")
            assert response.status_code == 200, response.text
            data = response.json()
            assert data["searched_with"].startswith("in-memory"), data  # not sqlite-vec, no 503
            assert data["index_behind"] is True and "catching up" in data["index_note"]
            assert new_id not in [r["id"] for r in data["results"]]  # the previous index answered
        page = await ds.client.get(f"/-/mapclip?like={new_id}&k=5")
        assert page.status_code == 200
    finally:
        gate.set()
    found = await caught_up(ds, lambda index: index.row_of(new_id) is not None)
    assert found.matrix is first.matrix
    data = (await ds.client.get(f"/-/mapclip/search.json?like={new_id}&k=5")).json()
    assert "index_behind" not in data and data["results"][0]["id"] == new_id
    assert [r["id"] for r in data["results"]][:2] == [new_id, 4]

    # a vector rewritten in place needs a full rebuild: it happens beside the live index
    gate.clear()
    store = MapStore(copy)
    row = store.conn.execute("SELECT * FROM maps WHERE id = 4").fetchone()
    record = MapRecord(source_id=row["source_id"], location=row["location"], source=row["source"])
    store.write_batch(store.model(), [record], near(old[20], 5, noise=0.001)[None])
    store.close()
    try:
        data = (await ds.client.get("/-/mapclip/search.json?like=20&k=3")).json()
        assert data["index_behind"] is True and data["searched_with"].startswith("in-memory")
        assert 4 not in [r["id"] for r in data["results"]]  # still the old vector of map 4
    finally:
        gate.set()
    rebuilt = await caught_up(ds, lambda index: index.matrix is not first.matrix)
    assert len(rebuilt) == 31 and not rebuilt.changes
    data = await same_as_sqlite_vec(ds, copy, "like=20&k=3")
    assert 4 in [r["id"] for r in data["results"]]


@pytest.mark.asyncio
async def test_one_cache_stays_beside_the_database_through_many_changes(copy):
    # compact after 2 added maps or 1 deleted one, so every kind of new base gets written
    ds = serve(copy, **LIVE, index_delta_rows=2, index_removed_rows=1)
    await wait_for_index(ds)
    await caught_up(ds)
    old = stored_vectors(copy)
    dim = len(old[1])
    one_copy = 30 * dim * 4
    expected = 30
    for step in range(4):
        ids = add_maps(copy, [near(old[step + 1], 10 * step + j) for j in range(3)], first=2000 + 10 * step)
        expected += 3
        await caught_up(ds, lambda index: index.row_of(ids[-1]) is not None and len(index) == expected)
        if step == 1:
            store = MapStore(copy)
            store.delete_vectors(store.model(), [ids[0]])
            store.close()
            expected -= 1
            await caught_up(ds, lambda index: len(index) == expected)
        if step == 2:  # a rewrite: rebuilt from the database
            store = MapStore(copy)
            record = MapRecord(source_id="new:2020", location="/new/2020.jpg", source="test")
            store.write_batch(store.model(), [record], near(old[3], 99)[None])
            store.close()
            await caught_up(ds, lambda index: index.state.rewrites == 1)
        caches = cache_files(copy)
        assert len(caches) == 1, caches
        [files] = caches.values()
        # current.json, one ids file, one matrix file, the int8 codes and their scale
        assert len(files) == 5, files
        assert sum(size for size, _ in files.values()) < 1.3 * expected * dim * 4 + 4096
    assert sum(size for size, _ in files.values()) > one_copy
    found = await caught_up(ds)
    assert len(found) == expected
    for query in ("like=2&k=10", "q=relief&k=8", f"like={ids[-1]}&k=5"):
        await same_as_sqlite_vec(ds, copy, query)


@pytest.mark.asyncio
async def test_a_restart_reads_the_int8_codes_from_the_cache_instead_of_quantising_again(copy, monkeypatch):
    """The int8 codes are cached beside the float32 vectors: a restarted server reads them back (no
    quantising pass over every vector) and answers exactly as before; codes that are cut short or
    belong to other vectors are quantised again, never used."""
    first = serve(copy, **LIVE)
    await wait_for_index(first)
    folder, = [f for f in copy.parent.iterdir() if f.name.endswith(".mapclip-index")]
    codes, = folder.glob("*.int8.faiss")
    query = "q=relief+map&k=7"
    before = (await first.client.get(f"/-/mapclip/search.json?{query}")).json()

    quantised = []
    build_codes = index_module.Int8Scanner.__init__

    def counting(self, matrix, *args, **kwargs):
        if matrix is not None:
            quantised.append(len(matrix))
        build_codes(self, matrix, *args, **kwargs)

    monkeypatch.setattr(index_module.Int8Scanner, "__init__", counting)
    for damage in (None, "truncate", "other rows"):
        if damage == "truncate":
            codes.write_bytes(codes.read_bytes()[:100])
        elif damage == "other rows":
            meta = codes.with_suffix(".json")
            meta.write_text(meta.read_text().replace('"rows": 30', '"rows": 29'))
        restarted = serve(copy, **LIVE)
        await wait_for_index(restarted)
        after = (await restarted.client.get(f"/-/mapclip/search.json?{query}")).json()
        assert after["searched_with"] == before["searched_with"] == "in-memory int8 + exact re-scoring"
        assert [r["id"] for r in after["results"]] == [r["id"] for r in before["results"]]
        assert quantised == ([] if damage is None else [30] * (1 if damage == "truncate" else 2)), damage
    assert sorted(p.name for p in folder.iterdir() if "int8" in p.name) == sorted([codes.name, codes.stem + ".json"])


@pytest.mark.asyncio
async def test_a_cold_build_streams_the_vectors_into_the_cache_and_survives_an_unwritable_one(copy, tmp_path,
                                                                                               monkeypatch):
    """Built cold, the vectors go from SQLite into the memory-mapped cache file chunk by chunk (no
    whole float32 copy in the server's memory: ``read_vectors`` is not used); where the cache cannot
    be written the index is still built, read a second time from the database."""
    from datasette_mapclip import store as store_module

    def whole_copy(*args, **kwargs):
        raise AssertionError("the whole float32 matrix was read into memory")

    monkeypatch.setattr(store_module, "read_vectors", whole_copy)
    monkeypatch.setattr(index_module, "CACHE_CHUNK_ROWS", 7)  # several steps through one ordered read
    ds = serve(copy, **LIVE)
    await wait_for_index(ds)
    await same_as_sqlite_vec(ds, copy, "q=relief+map&k=7")
    assert len(cache_files(copy)) == 1

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(copy, other / "maps.db")
    ds = serve(other / "maps.db", index_dir=str(blocked / "sub"), **LIVE)
    await wait_for_index(ds)
    await same_as_sqlite_vec(ds, other / "maps.db", "like=4&k=6")


@pytest.mark.asyncio
async def test_vectors_written_out_of_id_order_are_indexed_sorted(copy, monkeypatch):
    """The streamed cold build relies on sqlite-vec listing rows in map id order; a table written
    out of order (vectors re-written from the last map to the first) is read sorted instead."""
    from datasette_mapclip import store as store_module

    store = MapStore(copy)
    model = store.model()
    table = model["vector_table"]
    rows = store.conn.execute(f"SELECT map_id, embedding FROM [{table}]").fetchall()
    with store.transaction():
        store.conn.execute(f"DELETE FROM [{table}]")
        for map_id, embedding in sorted(rows, key=lambda row: -row[0]):
            store.conn.execute(f"INSERT INTO [{table}](map_id, embedding) VALUES (?, ?)", (map_id, embedding))
    listed = [row[0] for row in store.conn.execute(f"SELECT map_id FROM [{table}]")]
    store.close()
    assert listed != sorted(listed)  # the case this test is about
    sorted_reads = []
    read_sorted = store_module.read_vectors
    monkeypatch.setattr(store_module, "read_vectors", lambda *a: sorted_reads.append(1) or read_sorted(*a))
    ds = serve(copy, **LIVE)
    await wait_for_index(ds)
    assert sorted_reads == [1]
    for query in ("q=relief+map&k=7", "like=4&k=6", "q=chart&year_min=1810&k=5"):
        await same_as_sqlite_vec(ds, copy, query)


def insert_raw(path, map_id, vector):
    """A map and its vector written with plain SQL, as a user or another tool might: no MapStore,
    so no ``mapclip_meta`` counter moves."""
    table = first_table(path)
    conn = open_db(path)
    before = conn.execute("SELECT key, value FROM mapclip_meta ORDER BY key").fetchall()
    conn.execute("INSERT INTO maps (id, source_id, source, title, location) VALUES (?, ?, 'raw', ?, ?)",
                 (map_id, f"raw:{map_id}", f"Raw map {map_id}", f"/raw/{map_id}.jpg"))
    conn.execute(f"INSERT INTO [{table}] (map_id, embedding) VALUES (?, ?)", (map_id, vectors.encode(vector)))
    conn.commit()
    assert conn.execute("SELECT key, value FROM mapclip_meta ORDER BY key").fetchall() == before
    conn.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("new_id", [41, 35], ids=["above-the-largest-id", "below-the-largest-id"])
async def test_while_the_index_reads_a_plain_sql_insert_searches_say_it_is_behind(copy, monkeypatch, new_id):
    """However long reading the change takes (here: until the gate opens), the searches in the
    meantime either find the map added by plain SQL or say that the index is behind."""
    ds = serve(copy, **LIVE)
    await wait_for_index(ds)
    await caught_up(ds)
    old = stored_vectors(copy)
    insert_raw(copy, 40, near(old[9], 8))  # so that 35 is below the largest id
    await caught_up(ds, lambda index: index.row_of(40) is not None)
    gate = hold_catch_up(monkeypatch)
    new_vector = near(old[5], 7, noise=0.001)
    query = f"vector={vectors.encode(new_vector).hex()}&k=3"
    insert_raw(copy, new_id, new_vector)
    try:
        for _ in range(3):
            data = (await ds.client.get(f"/-/mapclip/search.json?{query}")).json()
            assert data["searched_with"].startswith("in-memory"), data
            assert data["results"][0]["id"] == new_id or data.get("index_behind") is True, data
    finally:
        gate.set()
    await caught_up(ds, lambda index: index.row_of(new_id) is not None)
    data = await same_as_sqlite_vec(ds, copy, query)
    assert "index_behind" not in data and [r["id"] for r in data["results"]][:2] == [new_id, 5]


@pytest.mark.asyncio
async def test_a_restart_answers_from_the_cached_vectors_while_the_int8_codes_load(copy, monkeypatch):
    """After a restart the cached float32 vectors answer exactly at once (the same maps as
    sqlite-vec), while the int8 codes are read back; then the int8 index takes over.  A cache that
    no longer holds the file's vectors is not used for that."""
    first = serve(copy, **LIVE)
    await wait_for_index(first)
    query = "q=relief+map&k=6"
    plain = (await serve(copy, index="off").client.get(f"/-/mapclip/search.json?{query}")).json()

    loading, release = threading.Event(), threading.Event()
    read_codes = index_module.Int8Scanner.load

    def slow_read(*args, **kwargs):
        loading.set()
        assert release.wait(30)
        return read_codes(*args, **kwargs)

    monkeypatch.setattr(index_module.Int8Scanner, "load", slow_read)
    restarted = serve(copy, **LIVE)
    live, collection = await live_of(restarted)
    assert collection.index() is None or collection.index().provisional
    try:
        for _ in range(200):
            if loading.is_set() and collection.index() is not None:
                break
            await asyncio.sleep(0.05)
        early = (await restarted.client.get(f"/-/mapclip/search.json?{query}")).json()
        assert early["searched_with"] == "in-memory exact", early["searched_with"]
        assert [r["id"] for r in early["results"]] == [r["id"] for r in plain["results"]]
        np.testing.assert_allclose([r["similarity"] for r in early["results"]],
                                   [r["similarity"] for r in plain["results"]], atol=1e-5)
    finally:
        release.set()
    await wait_for_index(restarted)
    later = (await restarted.client.get(f"/-/mapclip/search.json?{query}")).json()
    assert later["searched_with"] == "in-memory int8 + exact re-scoring"
    assert [r["id"] for r in later["results"]] == [r["id"] for r in plain["results"]]

    # a map added since the cache was written: the cache is not the file's state, no early answers
    assert index_module.provisional_index(str(copy), collection.model, collection.config) is not None
    add_maps(copy, [np.ones(collection.model.dim, np.float32) / np.sqrt(collection.model.dim)])
    assert index_module.provisional_index(str(copy), collection.model, collection.config) is None


@pytest.mark.asyncio
async def test_the_first_search_after_a_restart_waits_for_the_cached_vectors_not_sqlite_vec(copy, monkeypatch):
    """A search that arrives while the cache is still being checked waits for the exact index of the
    cached vectors (a few hundred ms at most) instead of scanning with sqlite-vec (seconds at Library
    of Congress scale, or the time limit's 503); with no usable cache it does not wait."""
    first = serve(copy, **LIVE)
    await wait_for_index(first)
    check = index_module.provisional_index

    def slow_check(*args, **kwargs):
        time.sleep(0.4)  # the cache's check on a busy machine
        return check(*args, **kwargs)

    monkeypatch.setattr(index_module, "provisional_index", slow_check)
    release = threading.Event()
    read_codes = index_module.Int8Scanner.load
    monkeypatch.setattr(index_module.Int8Scanner, "load", lambda *a, **k: release.wait(30) and read_codes(*a, **k))
    try:
        restarted = serve(copy, **LIVE)
        answer = (await restarted.client.get("/-/mapclip/search.json?q=relief+map&k=6")).json()
        assert answer["searched_with"] == "in-memory exact", answer["searched_with"]
    finally:
        release.set()

    # no cache to wait for: the first search goes straight to sqlite-vec
    for folder in copy.parent.glob("*.mapclip-index"):
        shutil.rmtree(folder)
    real_catch_up = index_module.catch_up
    monkeypatch.setattr(index_module, "catch_up", lambda *a, **k: release.wait(30) and real_catch_up(*a, **k))
    release.clear()
    try:
        cold = serve(copy, **LIVE)
        started = time.monotonic()
        answer = (await cold.client.get("/-/mapclip/search.json?q=relief+map&k=6")).json()
        assert answer["searched_with"] == "sqlite-vec" and time.monotonic() - started < 1.5
    finally:
        release.set()


@pytest.mark.asyncio
async def test_at_a_restart_the_codes_load_after_the_model_while_the_cached_vectors_answer(copy, monkeypatch):
    """Loading the model and the index's codes side by side slowed the model (which the first text
    search waits for): after a restart the cached vectors answer exactly until the model is loaded,
    then the codes load."""
    from datasette_mapclip.search import service

    first = serve(copy, **LIVE)
    await first.invoke_startup()
    await wait_for_index(first)
    loading, release = threading.Event(), threading.Event()
    real_encoder = service.SearchCollection.encoder

    def slow_encoder(self):
        loading.set()
        assert release.wait(30)
        return real_encoder(self)

    monkeypatch.setattr(service.SearchCollection, "encoder", slow_encoder)
    restarted = serve(copy, **LIVE)
    await restarted.invoke_startup()
    live, collection = await live_of(restarted)
    try:
        assert loading.wait(10)
        await asyncio.sleep(1.0)  # the codes load in well under a second here
        assert collection.index() is not None and collection.index().provisional
        assert live.builds == 0
    finally:
        release.set()
    index = await wait_for_index(restarted)
    assert not index.provisional and index.scanner is not None
