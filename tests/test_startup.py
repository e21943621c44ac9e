"""Server start-up: the index is built and the model loaded in the background, before any search."""

from __future__ import annotations

import asyncio

import pytest

from conftest import load_collection, make_datasette
from datasette_mapclip.state import state_for


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
    ``scan_threads`` in the index-scan thread (one by default)."""
    import faiss
    import torch

    from datasette_mapclip import search

    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {
        "threads": threads, "preload_model": False}}})
    await ds.invoke_startup()
    for pool in (search.MODEL, search.DECODE):
        assert pool.submit(torch.get_num_threads).result(timeout=20) == threads
    assert search.INDEX.submit(faiss.omp_get_max_threads).result(timeout=20) == 1
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {
        "scan_threads": 2, "preload_model": False}}})
    await ds.invoke_startup()
    assert search.INDEX.submit(faiss.omp_get_max_threads).result(timeout=20) == 2
