"""Word ids that name their map (``map_words.id = map_id * 2**20 + n``): written so, files from
before renumbered by a named migration, files that cannot be renumbered answered as before, and
hand-written rows that would be misfiled refused."""

from __future__ import annotations

import shutil

import pytest

from conftest import load_collection
from datasette_mapclip.search import sql as search_sql
from datasette_mapclip.search.query import SearchParams
from datasette_mapclip.store import MapStore, MapWord, WordStore
from datasette_mapclip.store.schema import applied_migrations, connect
from datasette_mapclip.store.words import (
    MAP_IDS_WITH_WORDS,
    WORD_ID_BITS,
    WordsNotStorable,
    read_maps_matching_words,
    word_id,
    word_ids_by_map,
)

PRINTED = {  # map id -> texts read on it, in reading order
    2: ["Cape Fear", "Wilmington", "Smithville"],
    3: ["CAPE FEAR RIVER", "Smithville"],
    5: ["Fear Creek", "Cape Cod"],
    7: ["Wilmington"],
}
QUERIES = {"Cape Fear": {2, 3, 5}, "Smithville": {2, 3}, "Wilmington": {2, 7}, "Cod": {5}, "Nowhere": set()}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 8)
    store = MapStore(db_path)
    words = WordStore(store)
    model = words.register_ocr_model({"engine": "test-ocr", "engine_version": "1", "weights": {}, "settings": {}})
    for map_id in range(1, 9):
        words.write_reading(map_id, model.id, [MapWord(t, 0.9, 0.1, 0.1 * n, 0.2, 0.05)
                                               for n, t in enumerate(PRINTED.get(map_id, []))])
    store.close()
    return db_path


def filtered(conn, words: str) -> set[int]:
    """The maps the whole-collection ``words`` filter keeps, and (checked the same) map by map."""
    params = SearchParams.from_args({"q": "survey", "words": words})
    whole: dict = {}
    found = {row[0] for row in conn.execute(search_sql.matching_ids_sql(params, whole), whole)}
    per_row: dict = {"ids": "[" + ",".join(str(i) for i in range(1, 9)) + "]"}
    assert {row[0] for row in conn.execute(search_sql.passing_ids_sql(params, per_row), per_row)} == found, words
    return found


def words_by_map(conn) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for map_id, text in conn.execute("SELECT map_id, text FROM map_words ORDER BY id"):
        found.setdefault(map_id, []).append(text)
    return found


def test_a_new_file_numbers_each_maps_words_from_its_id(collection):
    conn = connect(collection)
    assert word_ids_by_map(conn)
    for map_id, texts in PRINTED.items():
        ids = [row[0] for row in conn.execute("SELECT id FROM map_words WHERE map_id = ? ORDER BY id", (map_id,))]
        assert ids == [word_id(map_id, n) for n in range(len(texts))]
    # the full-text index's rowids are those ids
    assert {row[0] for row in conn.execute("SELECT rowid FROM map_words_fts WHERE map_words_fts MATCH 'smithville'")} \
        == {word_id(2, 2), word_id(3, 1)}
    conn.close()


def test_the_words_filter_answers_from_the_ids_alone(collection, tmp_path):
    """Where ids name their map, neither form of the filter reads a ``map_words`` row: with every
    row's map_id overwritten, the maps found are still the right ones."""
    path = tmp_path / "maps.db"
    shutil.copy(collection, path)
    conn = connect(path)
    conn.execute("UPDATE map_words SET map_id = 1")
    for words, expected in QUERIES.items():
        assert filtered(conn, words) == expected, words
    conn.close()


def make_row_numbered(path):
    """``path`` as a file written before word ids named their map: ids are row numbers (here in an
    order that interleaves the maps' words), the migration not yet run."""
    conn = connect(path)
    conn.execute("DELETE FROM mapclip_meta WHERE key IN ('word-ids', 'migration:word-ids-by-map')")
    rows = conn.execute("SELECT id FROM map_words ORDER BY text, id").fetchall()
    conn.execute("UPDATE map_words SET id = -1 - id")
    for number, (old,) in enumerate(rows, 1):
        conn.execute("UPDATE map_words SET id = ? WHERE id = ?", (number, -1 - old))
    conn.execute("INSERT INTO map_words_fts(map_words_fts) VALUES ('rebuild')")
    conn.commit()
    return conn


def test_a_file_from_before_is_answered_and_renumbered_when_opened_for_writing(collection, tmp_path):
    path = tmp_path / "maps.db"
    shutil.copy(collection, path)
    conn = make_row_numbered(path)
    assert not word_ids_by_map(conn)
    before = words_by_map(conn)
    assert max(row[0] for row in conn.execute("SELECT id FROM map_words")) < 1 << WORD_ID_BITS
    for words, expected in QUERIES.items():  # read as it is (Datasette opens files read-only)
        assert filtered(conn, words) == expected, words
    conn.close()

    MapStore(path).close()  # opened for writing: the migration runs
    conn = connect(path)
    assert word_ids_by_map(conn) and "word-ids-by-map" in applied_migrations(conn)
    assert words_by_map(conn) == before  # each map's words kept, in their order
    for map_id, texts in before.items():
        assert [row[0] for row in conn.execute("SELECT id FROM map_words WHERE map_id = ? ORDER BY id", (map_id,))] \
            == [word_id(map_id, n) for n in range(len(texts))]
    conn.execute("INSERT INTO map_words_fts(map_words_fts) VALUES ('integrity-check')")
    for words, expected in QUERIES.items():
        assert filtered(conn, words) == expected, words
        assert {m["map_id"] for m in read_maps_matching_words(conn, words)} == expected, words
    conn.close()


def test_a_file_whose_map_ids_are_too_large_keeps_its_row_numbers_and_is_answered(collection, tmp_path):
    path = tmp_path / "maps.db"
    shutil.copy(collection, path)
    conn = make_row_numbered(path)
    big = MAP_IDS_WITH_WORDS  # one past the largest map id whose words can be numbered by map
    conn.execute("INSERT INTO maps (id, source_id, title) SELECT ?, 'big', 'Big sheet' FROM maps WHERE id = 2", (big,))
    conn.execute("INSERT INTO map_words (map_id, text, confidence, x, y, w, h, angle, ocr_model) "
                 "SELECT ?, 'Nowhere', 0.9, 0, 0, 0.1, 0.1, 0, ocr_model FROM map_words LIMIT 1", (big,))
    conn.commit()
    ids_before = sorted(row[0] for row in conn.execute("SELECT id FROM map_words"))
    conn.close()

    store = MapStore(path)
    conn = store.conn
    assert not word_ids_by_map(conn) and "word-ids-by-map" in applied_migrations(conn)
    assert sorted(row[0] for row in conn.execute("SELECT id FROM map_words")) == ids_before
    found: dict = {}
    sql = search_sql.matching_ids_sql(SearchParams.from_args({"q": "survey", "words": "Nowhere"}), found)
    assert {row[0] for row in conn.execute(sql, found)} == {big}
    # a later reading of such a file goes on numbering rows
    model = conn.execute("SELECT id FROM ocr_models").fetchone()[0]
    WordStore(store).write_reading(7, model, [MapWord("Annapolis", 0.9, 0.1, 0.1, 0.2, 0.05)])
    assert filtered(conn, "Annapolis") == {7}
    store.close()


def test_words_a_file_cannot_number_by_map_are_refused_with_a_reason(collection, tmp_path):
    path = tmp_path / "maps.db"
    shutil.copy(collection, path)
    store = MapStore(path)
    words = WordStore(store)
    model = store.conn.execute("SELECT id FROM ocr_models").fetchone()[0]
    with pytest.raises(WordsNotStorable, match="outside"):
        words.write_reading(MAP_IDS_WITH_WORDS, model, [MapWord("Annapolis", 0.9, 0.1, 0.1, 0.2, 0.05)])
    with pytest.raises(WordsNotStorable, match="outside"):
        words.write_reading(-1, model, [])
    # a row written by hand with an id that does not name its map would be misfiled: refused
    with pytest.raises(Exception, match="map_words.id must be map_id"):
        store.conn.execute("INSERT INTO map_words (map_id, text, confidence, x, y, w, h, angle, ocr_model) "
                           "VALUES (7, 'Annapolis', 0.9, 0, 0, 0.1, 0.1, 0, ?)", (model,))
    with pytest.raises(Exception, match="map_words.id must be map_id"):
        store.conn.execute("INSERT INTO map_words (id, map_id, text, confidence, x, y, w, h, angle, ocr_model) "
                           "VALUES (?, 7, 'Annapolis', 0.9, 0, 0, 0.1, 0.1, 0, ?)", (word_id(8, 0), model))
    store.conn.execute("INSERT INTO map_words (id, map_id, text, confidence, x, y, w, h, angle, ocr_model) "
                       "VALUES (?, 7, 'Annapolis', 0.9, 0, 0, 0.1, 0.1, 0, ?)", (word_id(7, 1), model))
    assert filtered(store.conn, "Annapolis") == {7}
    assert filtered(store.conn, "Wilmington") == {2, 7}
    store.close()


def test_mapclip_ocr_records_a_map_it_cannot_number_and_reads_the_rest(collection, tmp_path, invoke):
    path = tmp_path / "maps.db"
    shutil.copy(collection, path)
    conn = connect(path)
    conn.execute("UPDATE maps SET id = ? WHERE id = 8", (MAP_IDS_WITH_WORDS,))
    source_id = conn.execute("SELECT source_id FROM maps WHERE id = ?", (MAP_IDS_WITH_WORDS,)).fetchone()[0]
    conn.commit()
    conn.close()
    out = invoke(["ocr", path, "--quiet"])
    assert "Traceback" not in out.output
    conn = connect(path)
    reason = conn.execute("SELECT reason FROM load_errors WHERE stage = 'ocr'").fetchall()
    assert len(reason) == 1 and "outside" in reason[0][0] and source_id in conn.execute(
        "SELECT source_id FROM load_errors WHERE stage = 'ocr'").fetchone()[0]
    read = {row[0] for row in conn.execute("SELECT map_id FROM map_words_read WHERE ocr_model = "
                                           "(SELECT max(id) FROM ocr_models)")}
    assert read == set(range(1, 8))  # every other map read by the new OCR model
    assert conn.execute("SELECT count(*) FROM map_words WHERE map_id = ?", (MAP_IDS_WITH_WORDS,)).fetchone()[0] == 0
    conn.close()
