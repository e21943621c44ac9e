import struct

import numpy as np
import pytest

from datasette_mapclip import vectors
from datasette_mapclip.records import MapRecord, parse_year
from datasette_mapclip.store import MapStore

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
