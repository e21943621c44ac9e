import struct

import numpy as np
import pytest

from datasette_mapclip.store import MapStore, vectors
from datasette_mapclip.store.records import MapRecord, parse_year

PROVENANCE = {"name": "test/unit", "architecture": "test", "dim": 4}


def record(n, **fields):
    return MapRecord(source_id=f"s{n}", location=f"/x/{n}.jpg", source="test", item_id=f"i{n // 2}",
                     sheet=n % 2 + 1, title=f"Map {n}", date=f"{1800 + n}", **fields)


def unit(rows):
    return vectors.normalise(np.asarray(rows, dtype=np.float32))


def test_vector_blob_is_llm_little_endian_float32():
    v = [0.5, -1.25, 3.0]
    assert vectors.encode(v) == struct.pack("<" + "f" * 3, *v)
    assert vectors.decode(vectors.encode(v)).tolist() == v
    with pytest.raises(ValueError, match="divisible by 4"):
        vectors.decode(b"abc")
    with pytest.raises(ValueError, match="expected a vector of 4 floats"):
        vectors.decode(vectors.encode(v), dim=4)


@pytest.mark.parametrize("date,year", [("1886-06", 1886), ("[ca. 1750]", 1750), ("between 1980 and 2006", 1980),
                                       ("c1910.", 1910), ("undated", None), (None, None), ("12345", None)])
def test_parse_year(date, year):
    assert parse_year(date) == year


def test_write_batch_then_read_vectors_into_numpy(tmp_path):
    store = MapStore(tmp_path / "m.db")
    model = store.register_model(PROVENANCE, precision="fp32")
    matrix = unit(np.random.RandomState(0).randn(5, 4))
    store.write_batch(model, [record(n, subjects=["relief", "roads"]) for n in range(5)], matrix)
    ids, stored = store.vectors()
    assert stored.dtype == np.float32 and stored.shape == (5, 4)
    np.testing.assert_array_equal(stored, matrix)
    # the documented numpy recipe, with nothing but the vector table and numpy
    blobs = [b for (b,) in store.conn.execute(f"SELECT embedding FROM {model['vector_table']} ORDER BY map_id")]
    np.testing.assert_array_equal(np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, 4), matrix)
    # sqlite-vec KNN on the stored vectors: the nearest to row 3 is row 3, cosine 1 - d^2/2
    hits = store.conn.execute(
        f"SELECT map_id, distance FROM {model['vector_table']} WHERE embedding MATCH ? AND k = 2 ORDER BY distance",
        (vectors.encode(matrix[3]),),
    ).fetchall()
    assert hits[0][0] == ids[3] and 1 - hits[0][1] ** 2 / 2 == pytest.approx(1.0, abs=1e-6)
    row = store.conn.execute("SELECT * FROM maps WHERE source_id = 's3'").fetchone()
    assert (row["title"], row["year"], row["item_id"], row["sheet"]) == ("Map 3", 1803, "i1", 2)
    assert store.conn.execute("SELECT sheet_count FROM items WHERE item_id = 'i1'").fetchone()[0] == 2


def test_full_text_index_follows_inserts_and_updates(tmp_path):
    store = MapStore(tmp_path / "m.db")
    model = store.register_model(PROVENANCE)
    store.write_batch(model, [record(1, place="Arkadelphia, Arkansas")], unit([[1, 0, 0, 0]]))
    search = "SELECT maps.source_id FROM maps_fts JOIN maps ON maps.id = maps_fts.rowid WHERE maps_fts MATCH ?"
    assert store.conn.execute(search, ("arkadelphia",)).fetchall()[0][0] == "s1"
    # a metadata refresh (same source_id) replaces the indexed text and keeps fields it does not know
    store.write_batch(model, [MapRecord(source_id="s1", location="x", source="test", place="Little Rock")],
                      unit([[0, 1, 0, 0]]))
    assert store.conn.execute(search, ("arkadelphia",)).fetchall() == []
    assert store.conn.execute(search, ("rock",)).fetchall()[0][0] == "s1"
    assert store.conn.execute("SELECT title FROM maps WHERE source_id='s1'").fetchone()[0] == "Map 1"
    assert store.conn.execute("SELECT count(*) FROM maps").fetchone()[0] == 1
    assert store.conn.execute(f"SELECT count(*) FROM {model['vector_table']}").fetchone()[0] == 1


def test_failed_batch_leaves_nothing_behind(tmp_path):
    store = MapStore(tmp_path / "m.db")
    model = store.register_model(PROVENANCE)
    with pytest.raises(Exception):
        # the second vector has the wrong dimension: sqlite-vec rejects it mid-transaction
        store.write_batch(model, [record(1), record(2)], [np.ones(4, np.float32), np.ones(3, np.float32)])
    assert store.counts()["maps"] == 0
    assert store.conn.execute(f"SELECT count(*) FROM {model['vector_table']}").fetchone()[0] == 0


def test_provenance_and_models_side_by_side(tmp_path):
    store = MapStore(tmp_path / "m.db")
    first = store.register_model(PROVENANCE)
    second = store.register_model({**PROVENANCE, "name": "test/finetuned", "dim": 8})
    assert first["vector_table"] != second["vector_table"]
    assert store.model()["name"] == "test/unit"  # the first model is the default
    assert store.model("test/finetuned")["dim"] == 8
    assert store.register_model(PROVENANCE)["id"] == first["id"]  # idempotent
    assert first["sqlite_vec_version"].startswith("v0.1")
    with pytest.raises(LookupError, match="no model 'nope'"):
        store.model("nope")


def _running_load(store, *, pid, host, seen):
    return store.conn.execute(
        "INSERT INTO loads (command, started_at, status, pid, host, updated_at) VALUES ('load x', ?, 'running', ?, ?, ?) "
        "RETURNING id", (seen, pid, host, seen)).fetchone()[0]


def _status(store, load_id):
    return tuple(store.conn.execute("SELECT status, finished_at IS NOT NULL, message FROM loads WHERE id = ?",
                                    (load_id,)).fetchone())


def test_a_later_run_marks_killed_runs_and_never_a_live_one(tmp_path):
    import datetime
    import os
    import subprocess
    import sys

    from datasette_mapclip import store as store_module

    store = MapStore(tmp_path / "m.db")
    here = store_module.host_id()
    fresh = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    old = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)).isoformat(timespec="seconds")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live_elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_here = _running_load(store, pid=int(gone), host=here, seen=fresh)
        alive_here = _running_load(store, pid=os.getpid(), host=here, seen=old)  # quiet but alive
        alive_other_process = _running_load(store, pid=live_elsewhere.pid, host=here, seen=old)
        fresh_other_host = _running_load(store, pid=1234, host="another-host", seen=fresh)
        stale_other_host = _running_load(store, pid=1234, host="another-host", seen=old)
        no_pid = _running_load(store, pid=None, host=None, seen=old)  # written by a version without pids

        new = MapStore(tmp_path / "m.db").start_load("load y", None)
    finally:
        live_elsewhere.kill()
        live_elsewhere.wait()
    status, finished, message = _status(store, dead_here)
    assert (status, finished) == ("killed", 1) and f"process {gone} on {here} ended without finishing" in message
    for load_id in (alive_here, alive_other_process, fresh_other_host):
        assert _status(store, load_id) == ("running", 0, None)
    assert _status(store, stale_other_host)[:2] == ("killed", 1)
    assert "has written nothing for 2.0 hours" in _status(store, stale_other_host)[2]
    assert _status(store, no_pid)[:2] == ("killed", 1)
    row = store.conn.execute("SELECT status, pid, host FROM loads WHERE id = ?", (new,)).fetchone()
    assert tuple(row) == ("running", os.getpid(), here)


def test_loads_of_an_older_database_gain_the_run_columns(tmp_path):
    import sqlite3

    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute("CREATE TABLE loads (id INTEGER PRIMARY KEY, command TEXT, model TEXT, started_at TEXT, "
                 "finished_at TEXT, status TEXT, loaded INTEGER, skipped INTEGER, failed INTEGER)")
    conn.execute("INSERT INTO loads (command, started_at, status) VALUES ('load', '2020-01-01T00:00:00+00:00', 'running')")
    conn.commit()
    conn.close()
    store = MapStore(tmp_path / "old.db")
    store.finish_load(store.start_load("load again", None), "finished", 1, 0, 0)
    assert [r[0] for r in store.conn.execute("SELECT status FROM loads ORDER BY id")] == ["killed", "finished"]


def test_named_migrations_run_once_per_file_and_are_recorded(tmp_path):
    from datasette_mapclip.store import MIGRATIONS, applied_migrations, connect, prepare_schema

    store = MapStore(tmp_path / "maps.db")
    assert applied_migrations(store.conn) == {name for name, _ in MIGRATIONS}
    store.close()
    conn = connect(tmp_path / "maps.db")
    assert prepare_schema(conn) == []  # nothing runs twice
    conn.execute("DELETE FROM mapclip_meta WHERE key = 'migration:load-liveness-columns'")
    assert prepare_schema(conn) == ["load-liveness-columns"]
    conn.close()
