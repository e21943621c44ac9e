"""Server start-up: the index is built and the model loaded in the background, before any search."""

from __future__ import annotations

import asyncio

import pytest

from conftest import load_collection, make_datasette
from datasette_mapclip.web.state import state_for


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 6)


async def loaded_encoders(ds, wait: float) -> int:
    for _ in range(int(wait / 0.05)):
        if state_for(ds).encoders._encoders:
            break
        await asyncio.sleep(0.05)
    return len(state_for(ds).encoders._encoders)


@pytest.mark.asyncio
async def test_the_model_is_loaded_at_start_up_not_at_the_first_text_search(collection):
    ds = make_datasette([str(collection[0])])
    await ds.invoke_startup()
    assert await loaded_encoders(ds, wait=20) == 1  # no search was made


@pytest.mark.asyncio
async def test_preloading_can_be_turned_off(collection):
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"preload_model": False}}})
    await ds.invoke_startup()
    assert await loaded_encoders(ds, wait=1) == 0
    assert (await ds.client.get("/-/mapclip/search.json?q=roads&k=2")).status_code == 200
    assert await loaded_encoders(ds, wait=1) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("threads", [1, 2])
async def test_the_threads_settings_reach_the_threads_that_do_the_work(collection, threads):
    """torch and faiss count threads per thread: ``threads`` is set in the model and decode threads
    (where encoding runs), not on the event loop, whose start it would hold up while torch imports;
    the index thread runs faiss on one thread (an index splits its own scans: ``scan_threads``)."""
    import faiss
    import torch

    from datasette_mapclip.web.state import state_for

    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {
        "threads": threads, "preload_model": False}}})
    await ds.invoke_startup()
    workers = state_for(ds).workers
    for pool in (workers.model, workers.decode):
        assert pool.submit(torch.get_num_threads).result(timeout=20) == threads
    assert workers.index.submit(faiss.omp_get_max_threads).result(timeout=20) == 1
    other = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {
        "threads": 3 - threads, "preload_model": False}}})
    await other.invoke_startup()
    assert state_for(other).workers.model.submit(torch.get_num_threads).result(timeout=20) == 3 - threads
    # each server's threads are its own: the second one's start-up left the first one's alone
    assert workers.model.submit(torch.get_num_threads).result(timeout=20) == threads


def foreign_database(path, make_broken_collection=None) -> str:
    """A database that is not a mapclip collection but has tables named ``maps`` and ``models``
    (a game's, a GIS project's): nothing of the plugin may touch it, least of all at start-up."""
    import sqlite3

    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE maps (level INTEGER, terrain TEXT);
        CREATE TABLE models (label TEXT);
        INSERT INTO maps VALUES (1, 'swamp');
        INSERT INTO models VALUES ('orc');
    """)
    conn.commit()
    conn.close()
    return str(path)


@pytest.mark.asyncio
async def test_a_database_with_tables_named_maps_and_models_is_not_taken_for_a_collection(collection, tmp_path):
    foreign = foreign_database(tmp_path / "game.db")
    ds = make_datasette([foreign, str(collection[0])])
    await ds.invoke_startup()  # used to raise (KeyError from its models rows): every request then failed
    assert (await ds.client.get("/")).status_code == 200
    table = await ds.client.get("/game/maps.json?_shape=array")
    assert table.status_code == 200 and table.json() == [{"rowid": 1, "level": 1, "terrain": "swamp"}]
    searched = await ds.client.get("/-/mapclip/search.json?q=roads&k=2")  # the real collection, not the first database
    assert searched.status_code == 200 and searched.json()["database"] == "maps", searched.text
    refused = await ds.client.get("/-/mapclip/search.json?q=roads&k=2&_db=game")
    assert refused.status_code == 400 and "no mapclip collection named 'game'" in refused.json()["error"]
    page = await ds.client.get("/game")
    assert page.status_code == 200 and "/-/mapclip?_db=game" not in page.text  # no search link offered there


@pytest.mark.asyncio
async def test_a_collection_that_cannot_be_read_at_start_up_leaves_the_others_served(collection, tmp_path, caplog):
    """A collection whose models rows cannot be used (written by hand, or by a broken tool) is reported
    at start-up; the server starts, the other collections search, and a search of it says why (503:
    the server's file, not the request, is at fault)."""
    import shutil
    import sqlite3

    broken = tmp_path / "broken.db"
    shutil.copy(collection[0], broken)
    conn = sqlite3.connect(broken)
    conn.execute("UPDATE models SET is_default = 'yes'")  # SQLite keeps text in an INTEGER column
    conn.commit()
    conn.close()
    ds = make_datasette([str(broken), str(collection[0])])
    with caplog.at_level("WARNING"):
        await ds.invoke_startup()
    assert any("broken" in record.getMessage() for record in caplog.records), [r.getMessage() for r in caplog.records]
    searched = await ds.client.get("/-/mapclip/search.json?q=roads&k=2&_db=maps")
    assert searched.status_code == 200, searched.text
    answer = await ds.client.get("/-/mapclip/search.json?q=roads&k=2&_db=broken")
    assert answer.status_code == 503 and "'broken' cannot be searched" in answer.json()["error"], answer.text
    assert "models table" in answer.json()["error"]
