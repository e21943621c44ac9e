"""The connections the plugin prepares: freed when Datasette drops them unclosed, extension loading
off whatever happens, sqlite-vec only where a collection needs it, and SQL function arguments
capped before they are read."""

from __future__ import annotations

import gc
import sqlite3
import tracemalloc
from unittest import mock

import numpy as np
import pytest

from conftest import load_collection, make_datasette, query_json_path

HUGE = 100_000_000  # bytes: a zeroblob costs SQLite nothing until someone reads it


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 6)
    plain = tmp_path_factory.mktemp("plain") / "plain.db"
    with sqlite3.connect(plain) as conn:
        conn.execute("create table notes (id integer primary key, text text)")
    return db_path, plain


def prepared(ds, name):
    """A connection to a served database, opened and prepared by Datasette's hooks, that nothing but
    the caller holds (``Database.connect()`` keeps its own list of connections, to close them)."""
    from datasette.utils.sqlite import sqlite3 as datasette_sqlite3

    conn = datasette_sqlite3.connect(str(ds.databases[name].path), check_same_thread=False)
    ds._prepare_connection(conn, name)
    return conn


def test_connections_dropped_without_close_are_freed(collection):
    from datasette_mapclip.search import sqlite_native

    db_path, plain = collection
    ds = make_datasette([str(db_path), str(plain)])
    gc.collect()
    before = sqlite_native.registered_count()
    for name in ("maps", "plain"):
        for _ in range(30):
            conn = prepared(ds, name)
            assert conn.execute("select mapclip_similarity(x'0000803f', x'0000803f')").fetchone()[0] == 1.0
            del conn  # dropped, as Datasette drops its /-/versions connection
    gc.collect()
    assert sqlite_native.registered_count() == before


async def test_anonymous_versions_requests_leave_nothing_behind(collection):
    from datasette_mapclip.search import sqlite_native

    db_path, _ = collection
    ds = make_datasette([str(db_path)])
    await ds.invoke_startup()
    for _ in range(3):  # the thread pool's own connections are opened once and kept: not a leak
        await ds.client.get("/maps.json")
    gc.collect()
    before = sqlite_native.registered_count()
    for _ in range(60):
        response = await ds.client.get("/-/versions.json")
        assert response.status_code == 200
    gc.collect()
    # A leak keeps each request's four registrations (240); the count is the process's, so a few
    # connections that other servers' background threads hold open meanwhile are allowed.
    assert sqlite_native.registered_count() - before < 40


def test_extension_loading_stays_off_when_sqlite_vec_fails_to_load(collection, monkeypatch):
    import sqlite_vec

    def broken(conn):
        conn.load_extension("/nonexistent/vec0")

    monkeypatch.setattr(sqlite_vec, "load", broken)
    db_path, _ = collection
    conn = prepared(make_datasette([str(db_path)]), "maps")
    with pytest.raises(Exception, match="not authorized"):
        conn.execute("select load_extension('/nonexistent/anything')")


def test_extension_loading_is_off_after_sqlite_vec_loads(collection):
    db_path, _ = collection
    conn = prepared(make_datasette([str(db_path)]), "maps")
    assert conn.execute("select vec_version()").fetchone()[0]
    with pytest.raises(Exception, match="not authorized"):
        conn.execute("select load_extension('/nonexistent/anything')")


def test_sqlite_vec_goes_only_into_collections(collection):
    db_path, plain = collection
    ds = make_datasette([str(db_path), str(plain)])
    assert prepared(ds, "maps").execute("select vec_version()").fetchone()[0]
    with pytest.raises(Exception, match="no such function: vec_version"):
        prepared(ds, "plain").execute("select vec_version()")
    # As Datasette's own suite checks: a database that is not a collection sees no extension calls.
    connection = mock.Mock()
    ds._prepare_connection(connection, "data")
    assert connection.enable_load_extension.mock_calls == []
    assert connection.load_extension.mock_calls == []



def test_collections_are_read_through_a_memory_map_as_set(collection):
    """``sqlite_mmap_mb`` has SQLite read a collection through a memory map (word and full-text
    lookups on a large file copy no pages); off by default; other databases keep their own."""
    db_path, plain = collection
    mmap_size = "pragma mmap_size"
    ds = make_datasette([str(db_path), str(plain)], metadata={"plugins": {"datasette-mapclip": {"sqlite_mmap_mb": 64}}})
    assert prepared(ds, "maps").execute(mmap_size).fetchone()[0] == 64 * 1024 * 1024
    assert prepared(ds, "plain").execute(mmap_size).fetchone()[0] == 0
    assert prepared(make_datasette([str(db_path)]), "maps").execute(mmap_size).fetchone()[0] == 0
    for megabytes in (0, 128):
        ds = make_datasette([str(db_path)], metadata={"plugins": {"datasette-mapclip": {"sqlite_mmap_mb": megabytes}}})
        assert prepared(ds, "maps").execute(mmap_size).fetchone()[0] == megabytes * 1024 * 1024
    from datasette_mapclip.search.local import Collection

    with Collection(db_path, settings={"sqlite_mmap_mb": 32}) as maps:
        assert maps._run(maps.db.execute_fn(
            lambda conn: conn.execute(mmap_size).fetchone()[0])) == 32 * 1024 * 1024


OVERSIZED = [
    ("select mapclip_similarity(zeroblob(:n), zeroblob(:n))", "mapclip_similarity: argument 1"),
    ("select mapclip_similarity(x'0000803f', zeroblob(:n))", "mapclip_similarity: argument 2"),
    ("select mapclip_combine(zeroblob(:n), 1)", "mapclip_combine: argument 1"),
    ("select mapclip_embed_text(cast(zeroblob(:n) as text))", "mapclip_embed_text: argument 1"),
    ("select mapclip_embed_image(zeroblob(:n))", "mapclip_embed_image: argument 1"),
]


@pytest.mark.parametrize("sql,message", OVERSIZED)
def test_oversized_arguments_are_refused_before_they_are_read(collection, sql, message):
    db_path, _ = collection
    conn = prepared(make_datasette([str(db_path)]), "maps")
    tracemalloc.start()
    try:
        with pytest.raises(Exception, match=message + r" is 100,000,000 bytes, limit"):
            conn.execute(sql, {"n": HUGE}).fetchone()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # the value was never copied into Python


def test_vectors_longer_than_any_model_are_refused_on_both_paths(collection):
    from test_architecture import _functions

    from datasette_mapclip.search.sql_functions import MAX_VECTOR_FLOATS, register

    db_path, _ = collection
    native = prepared(make_datasette([str(db_path)]), "maps")
    python = sqlite3.connect(":memory:")
    assert register(python, _functions()) == "python"
    longest = np.ones(MAX_VECTOR_FLOATS, "<f4").tobytes()
    too_long = np.ones(MAX_VECTOR_FLOATS + 1, "<f4").tobytes()
    for conn in (native, python):
        assert conn.execute("select mapclip_similarity(?, ?)", (longest, longest)).fetchone()[0] == pytest.approx(1.0)
        with pytest.raises(Exception):
            conn.execute("select mapclip_similarity(?, ?)", (too_long, too_long)).fetchone()
    with pytest.raises(Exception, match="bytes, limit"):  # the native path says why
        native.execute("select mapclip_similarity(?, ?)", (too_long, too_long)).fetchone()


def test_every_hook_the_plugin_implements_exists_in_this_datasette():
    """Datasette 1.0 has no get_metadata hook: implementing it anyway fails Datasette's own suite
    (its check that every implemented hook is a documented one)."""
    from datasette import hookspecs

    import datasette_mapclip

    implemented = [name for name in dir(datasette_mapclip)
                   if hasattr(getattr(datasette_mapclip, name), "datasette_impl")]
    assert "prepare_connection" in implemented and "register_routes" in implemented
    assert [name for name in implemented if not hasattr(hookspecs, name)] == []


async def test_sql_functions_run_the_model_in_the_servers_model_thread(collection, monkeypatch):
    """As the search route does: never in Datasette's SQL threads, where a second torch pool would
    compete with the model thread's."""
    import threading

    from datasette_mapclip.model.encoders import SharedEncoder

    seen = []
    real = SharedEncoder.embed_text

    def spy(self, text):
        seen.append(threading.current_thread().name)
        return real(self, text)

    monkeypatch.setattr(SharedEncoder, "embed_text", spy)
    db_path, _ = collection
    ds = make_datasette([str(db_path)])
    response = await ds.client.get(query_json_path("maps") + "?sql=select+length(mapclip_embed_text('a+map'))+as+n"
                                   "&_shape=array", follow_redirects=True)
    assert response.status_code == 200, response.text
    assert response.json()[0]["n"] > 0
    assert seen and all(name.startswith("mapclip-model") for name in seen), seen


def test_a_connection_never_frees_its_registration_itself():
    """pysqlite3 lets go of a connection's functions in a callback that may run without the GIL (a
    deferred close completed by the last ``sqlite3_finalize``); freeing a Python object there
    aborts the process.  So the registration outlives the connection's reference, and is freed
    by the module, with the GIL, at its next sweep."""
    import ctypes

    from datasette_mapclip.search import sqlite_native
    from datasette_mapclip.store import sqlite3_module

    conn = sqlite3_module().connect(":memory:")
    assert sqlite_native.register(conn, {"mapclip_probe": (lambda: 1, 0, 100)}, ValueError)
    address = sqlite_native._held_addresses[-1]
    refs = lambda: ctypes.c_ssize_t.from_address(address).value  # noqa: E731 (no reference taken)
    assert refs() == 2  # the connection's and the module's
    assert conn.execute("SELECT mapclip_probe()").fetchone() == (1,)
    conn.close()
    assert refs() == 1 and address in sqlite_native._held_addresses  # the connection's release freed nothing
    sqlite_native.registered_count()  # a sweep
    assert address not in sqlite_native._held_addresses
