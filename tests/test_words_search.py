"""Searching by the words printed on the maps (``words``, read by OCR into map_words): a filter
inside the vector search on both search paths, case and accents folded, each result showing the
words it matched; user text is data (no FTS5 syntax error, escaped on the page)."""

from __future__ import annotations

import html
import json
import re
import shutil
import unicodedata

import pytest

from conftest import load_collection, make_datasette
from datasette_mapclip.search.local import Collection
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.words import MapWord, WordStore, words_query_terms

HOSTILE = '<script>alert("w")</script>'
PRINTED = {  # map id -> texts read on it
    2: ["Cape Fear", "Wilmington"],
    3: ["CAPE FEAR RIVER", "Smithville"],
    5: ["CapeFear"],  # OCR dropped the space
    7: ["Cape Hatteras", "Fear Creek"],  # both words, apart
    8: ["Cape Cod"],
    9: ["Côte-d'Or", HOSTILE],
}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    db_path, folder = load_collection(tmp_path_factory, model_args, 12)
    copy = tmp_path_factory.mktemp("words") / "maps.db"
    shutil.copy(db_path, copy)
    store = MapStore(copy)
    words = WordStore(store)
    model = words.register_ocr_model({"engine": "test-ocr", "engine_version": "1", "weights": {}, "settings": {}})
    for map_id in range(1, 13):  # every map read; most print nothing
        words.write_reading(map_id, model.id, [MapWord(text, 0.9, 0.1, 0.1, 0.2, 0.05) for text in PRINTED.get(map_id, [])])
    store.close()
    return copy, db_path


@pytest.fixture(scope="module", params=["index", "sqlite-vec"])
def ds(collection, request):
    config = {"plugins": {"datasette-mapclip": {"index": "off" if request.param == "sqlite-vec" else "auto"}}}
    return make_datasette([str(collection[0])], metadata=config)


@pytest.mark.parametrize("words,expected", [
    ("Cape Fear", {2, 3, 5, 7}),  # every word anywhere on the map, or run together
    ("cape FEAR", {2, 3, 5, 7}),
    ("capefear", {5}),
    ("Wilmington", {2}),
    ("cote", {9}),  # accents folded
    ("Cape", {2, 3, 7, 8}),
    ("Nowhere", set()),
])
async def test_words_filter_the_search_on_both_paths(ds, words, expected):
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "words": words, "k": 12})).json()
    assert {r["id"] for r in data["results"]} == expected, data
    for result in data["results"]:
        shown = folded(" ".join(result["words"]))
        assert result["words"] and all(folded(w) in shown or folded(w) in shown.replace(" ", "")
                                       for w in words.split()), result


@pytest.mark.parametrize("counted_up_to", [0, 20_000])
async def test_words_printed_on_few_maps_search_the_filters_maps_at_once(collection, monkeypatch, counted_up_to):
    """A words filter whose rarest word is read fewer than WORDS_COUNTED_UP_TO times searches the
    maps printing it straight away (checking the nearest maps one by one would cost more and keep
    few); otherwise the nearest maps are checked first.  Both give the same maps in the same order."""
    from datasette_mapclip.search import sql as search_sql

    monkeypatch.setattr(search_sql, "WORDS_COUNTED_UP_TO", counted_up_to)
    ds = make_datasette([str(collection[0])])
    plain = [r["id"] for r in (await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "k": 12})).json()["results"]]
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "words": "Cape Fear", "k": 3})).json()
    assert [r["id"] for r in data["results"]] == [m for m in plain if m in {2, 3, 5, 7}][:3]
    assert ("filter's maps" in data["searched_with"]) == (counted_up_to > 0), data["searched_with"]


def folded(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text.casefold()) if not unicodedata.combining(c))


async def test_words_results_keep_the_vector_order(ds):
    plain = (await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "k": 12})).json()["results"]
    filtered = (await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "k": 12, "words": "cape"})).json()
    assert [r["id"] for r in filtered["results"]] == [r["id"] for r in plain if r["id"] in {2, 3, 7, 8}]


@pytest.mark.parametrize("words", ['NEAR("a" b)', "*", '" OR 1=1 --', "col:cape", "AND", "cape* fear^"])
async def test_user_text_is_never_fts_syntax(ds, words):
    response = await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "words": words})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert "words" in response.json()["error"]


async def test_the_page_shows_the_matched_words_escaped(ds):
    page = (await ds.client.get("/-/mapclip", params={"q": "survey", "words": "script alert", "k": 12})).text
    assert HOSTILE not in page
    card = page.split('data-id="9"', 1)[1].split("</li>", 1)[0]
    assert "Printed on the map:" in card and "<mark>&lt;script&gt;alert(" in card
    assert html.unescape(re.search(r"<mark>(.*?)</mark>", card).group(1)) == HOSTILE  # shown whole, as text
    assert 'name="words"' in (await ds.client.get("/-/mapclip")).text  # the filter is offered where words were read


async def test_a_collection_without_words_says_so(collection):
    ds = make_datasette([str(collection[1])])
    response = await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "words": "cape"})
    assert response.status_code == 400 and "mapclip ocr" in response.json()["error"]
    assert 'name="words"' not in (await ds.client.get("/-/mapclip")).text


def test_python_and_cli_search_take_words(collection, invoke):
    with Collection(collection[0]) as maps:
        ids = {r["id"] for r in maps.search("survey", words="Cape Fear", k=12)["results"]}
    assert ids == {2, 3, 5, 7}
    out = invoke(["search", collection[0], "survey", "--words", "Wilmington", "--json"]).output
    assert [r["id"] for r in __import__("json").loads(out)["results"]] == [2]
    assert re.search(r"Wilmington", out)


async def test_a_map_page_lists_its_words_and_a_result_opens_it_at_the_matched_word(ds):
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "survey", "words": "Wilmington"})).json()
    (result,) = data["results"]
    assert re.search(r"/-/mapclip/map/maps/2\?word=\d+$", result["map_url"])
    page = await ds.client.get(result["map_url"])
    assert page.status_code == 200
    listed = re.findall(r"<li( class=\"mapclip-word-match\")?>([^<]*)</li>", page.text.split('id="mapclip-words"', 1)[1])
    assert [text for _, text in listed] == ["Cape Fear", "Wilmington"]
    assert [text for marked, text in listed if marked] == ["Wilmington"]
    details = (await ds.client.get("/-/mapclip/map/maps/9.json")).json()
    assert {w["text"] for w in details["words"]} == set(PRINTED[9])
    assert all(0 <= w["x"] <= 1 and 0 <= w["y"] <= 1 for w in details["words"])
    assert HOSTILE not in (await ds.client.get("/-/mapclip/map/maps/9")).text


# -- rank=hybrid: CLIP, catalogue full-text and printed words fused by reciprocal rank ----------

async def run_reported_sql(ds, data):
    from conftest import query_json_path

    response = await ds.client.get(query_json_path(data["database"]), params={
        "sql": data["sql"], **{k: str(v) for k, v in data["params"].items()}, "_shape": "array"},
        follow_redirects=True)
    assert response.status_code == 200, response.text[:800]
    return response.json()


async def test_hybrid_puts_a_map_that_only_prints_the_word_first(ds):
    plain = (await ds.client.get("/-/mapclip/search.json", params={"q": "Wilmington", "k": 12})).json()["results"]
    clip_order = [r["id"] for r in plain]
    assert clip_order[0] != 2  # the picture model alone does not find it first
    data = (await ds.client.get("/-/mapclip/search.json",
                                params={"q": "Wilmington", "rank": "hybrid", "k": 12})).json()
    # reciprocal rank fusion written out again: the CLIP list, and map 2 the only map printing the word
    # (no catalogue record names Wilmington)
    score = {m: 1 / (60 + place) + (1 / 61 if m == 2 else 0) for place, m in enumerate(clip_order, 1)}
    want = sorted(score, key=lambda m: (-round(score[m], 12), m))
    assert [r["id"] for r in data["results"]] == want
    assert data["results"][0]["ranks"] == {"clip": clip_order.index(2) + 1, "words": 1}
    assert data["ranking"] == "hybrid" and "printed words" in data["searched_with"]
    rows = await run_reported_sql(ds, data)
    assert [r["id"] for r in rows] == want
    assert json.loads(rows[0]["ranks"]) == data["results"][0]["ranks"]


async def test_hybrid_respects_the_filters(ds):
    everything = (await ds.client.get("/-/mapclip/search.json", params={"q": "Cape Fear", "k": 12})).json()["results"]
    year_of = {r["id"]: r["year"] for r in everything}
    year_min = year_of[2] + 1
    data = (await ds.client.get("/-/mapclip/search.json", params={
        "q": "Cape Fear", "rank": "hybrid", "year_min": str(year_min), "k": 12})).json()
    ids = [r["id"] for r in data["results"]]
    assert 2 not in ids and all(r["year"] >= year_min for r in data["results"])
    # the words list holds only the maps that pass: those printing "Cape" or "Fear" from that year on
    printing = {m for m in (2, 3, 5, 7, 8) if year_of[m] >= year_min}
    assert printing and {r["id"] for r in data["results"] if "words" in r["ranks"]} == printing
    assert [r["id"] for r in await run_reported_sql(ds, data)] == ids


async def test_hybrid_without_words_read_fuses_clip_and_the_catalogue(collection):
    ds = make_datasette([str(collection[1])])  # the same maps, no OCR
    plain = [r["id"] for r in (await ds.client.get("/-/mapclip/search.json",
                                                    params={"q": "number 7", "k": 12})).json()["results"]]
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "number 7", "rank": "hybrid", "k": 12})).json()
    assert data["ranking"] == "hybrid" and "printed words" not in data["searched_with"]
    assert all(set(r["ranks"]) <= {"clip", "catalogue"} for r in data["results"])
    seven = next(r for r in data["results"] if r["title"] == "Map number 7 of Vermont")
    assert seven["ranks"]["catalogue"] == 1  # the only record with both words
    ids = [r["id"] for r in data["results"]]
    assert seven["id"] not in plain or ids.index(seven["id"]) <= plain.index(seven["id"])
    assert [r["id"] for r in await run_reported_sql(ds, data)] == ids


async def test_hybrid_ranks_printed_words_rarest_word_first(ds):
    """The printed words' list reads the query's rarest word first: "capefear" is read on one map,
    "Fear" on three, "Cape" on four; within a word, maps come in the order their words were read."""
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "Cape Fear", "rank": "hybrid", "k": 12})).json()
    words_rank = {r["id"]: r["ranks"]["words"] for r in data["results"] if "words" in r["ranks"]}
    assert words_rank == {5: 1, 2: 2, 3: 3, 7: 4, 8: 5}
    assert data["params"]["printed_1"] == '"capefear"' and data["params"]["printed_3"] == '"Cape"'
    assert [r["id"] for r in await run_reported_sql(ds, data)] == [r["id"] for r in data["results"]]


async def test_hybrid_leaves_out_catalogue_words_in_more_than_half_the_records(collection):
    """bm25 gives a word in most records no weight, and ranking by it would score every record:
    "map" is in every title here, so "map 7" ranks the catalogue by "7" alone, and "map of" has no
    catalogue list."""
    ds = make_datasette([str(collection[1])])
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "map 7", "rank": "hybrid", "k": 12})).json()
    found = [r for r in data["results"] if "catalogue" in r["ranks"]]
    assert [r["title"] for r in found] == ["Map number 7 of Vermont"] and found[0]["ranks"]["catalogue"] == 1
    assert data["params"]["catalogue_text"] == '"7"'
    assert [r["id"] for r in await run_reported_sql(ds, data)] == [r["id"] for r in data["results"]]
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": "map of", "rank": "hybrid", "k": 12})).json()
    assert all(set(r["ranks"]) == {"clip"} for r in data["results"]) and "catalogue_text" not in data["params"]
    assert "more than half the records" in data["searched_with"]
    # every word is counted first: a text of many words looks for its first 16 different ones
    many = " ".join(f"w{i}" for i in range(40)) + " 7 w0"
    data = (await ds.client.get("/-/mapclip/search.json", params={"q": many, "rank": "hybrid", "k": 12})).json()
    assert data["params"]["catalogue_text"] == " OR ".join(f'"w{i}"' for i in range(16))


def test_python_and_cli_search_take_rank_hybrid(collection, invoke):
    with Collection(collection[0]) as maps:
        first = maps.search("Wilmington", rank="hybrid", k=5)["results"][0]
    assert first["id"] == 2 and first["ranks"]["words"] == 1
    out = invoke(["search", collection[0], "Wilmington", "--rank", "hybrid", "-k", "5"]).output
    assert re.search(r"^\s*1\s+\S+\s+2\s.*\[clip #\d+, words #1\]", out, re.M), out
    bad = invoke(["search", collection[0], "Wilmington", "--rank", "best"], expect=2)
    assert "best" in bad.output and "Traceback" not in bad.output


# -- checked map by map: the few candidates of an index search, and the words a result shows ----

def insert_words(conn, model: int, rows):
    """Words written by hand as the file's word ids require: each map's next id where ids name their
    map (``store.words.word_id``), the next row number in a file from before that."""
    from datasette_mapclip.store.words import WORD_ID_BITS, word_ids_by_map

    by_map = word_ids_by_map(conn)
    for map_id, text in rows:
        word_id = conn.execute(f"SELECT coalesce(max(id) + 1, ? << {WORD_ID_BITS}) FROM map_words WHERE map_id = ?",
                               (map_id, map_id)).fetchone()[0] if by_map else None
        conn.execute("INSERT INTO map_words (id, map_id, text, confidence, x, y, w, h, angle, ocr_model) "
                     "VALUES (?, ?, ?, 0.9, 0.1, 0.1, 0.1, 0.1, 0, ?)", (word_id, map_id, text, model))


@pytest.mark.parametrize("word_ids", ["by-map", "row numbers"])
@pytest.mark.parametrize("read_whole_up_to", [0, 2000])  # every term looked up map by map; rare terms read whole
def test_the_per_map_check_answers_what_the_whole_collection_filter_does(collection, tmp_path, monkeypatch,
                                                                         read_whole_up_to, word_ids):
    """Candidates are checked map by map (an FTS5 lookup bounded to the map's own word ids), the
    whole collection by reading every match: both give the same maps, where word ids name their map
    and in a file from before that, also when a map's words are not one run of ids there (written
    by hand, interleaved with another map's)."""
    from datasette_mapclip.search import sql as search_sql
    from datasette_mapclip.search.query import SearchParams

    monkeypatch.setattr(search_sql, "WORDS_READ_WHOLE_UP_TO", read_whole_up_to)
    path = tmp_path / "interleaved.db"
    shutil.copy(collection[0], path)
    store = MapStore(path)
    conn = store.conn
    if word_ids == "row numbers":
        conn.execute("DELETE FROM mapclip_meta WHERE key = 'word-ids'")
    model = conn.execute("SELECT id FROM ocr_models").fetchone()[0]
    insert_words(conn, model, ((10, "Zeta"), (11, "Eta"), (10, "Theta"), (11, "Iota Cape"), (10, "Kappa")))
    every = "[" + ",".join(str(row[0]) for row in conn.execute("SELECT id FROM maps")) + "]"
    for words, expected in (("Eta", {11}), ("Iota", {11}), ("Theta", {10}), ("Zeta Kappa", {10}),
                            ("Eta Theta", set()), ("Cape", {2, 3, 7, 8, 11}), ("Cape Fear", {2, 3, 5, 7}),
                            ("wilmington", {2}), ("Nowhere", set())):
        params = SearchParams.from_args({"q": "survey", "words": words})
        per_row: dict = {"ids": every}
        whole: dict = {}
        checked = {row[0] for row in conn.execute(search_sql.passing_ids_sql(params, per_row), per_row)}
        assert "EXISTS" in search_sql.passing_ids_sql(params, {"ids": every})  # the per-map form ran
        assert checked == {row[0] for row in conn.execute(search_sql.matching_ids_sql(params, whole), whole)}
        # the whole-collection form driven by the rarest term answers the same
        counts = search_sql.count_word_matches(conn, words_query_terms(words))
        driven: dict = {}
        assert checked == {row[0] for row in conn.execute(
            search_sql.matching_ids_sql(params, driven, word_counts=counts), driven)}
        assert checked == expected, words
    shown: dict = {}
    rows = conn.execute(search_sql.matched_words_sql("Eta Cape", [10, 11, 2], shown), shown).fetchall()
    assert [(row[0], row[1]) for row in rows] == [(2, "Cape Fear"), (11, "Eta"), (11, "Iota Cape")]
    store.close()


def test_a_filter_of_several_words_reads_only_the_rarest_ones_maps(collection, tmp_path):
    """"Cape" printed 3,000 times, "Fear" a few: the whole-collection filter "Cape Fear" reads the
    maps printing "Fear" and checks "Cape" on each, instead of reading every "Cape" first."""
    from datasette_mapclip.search import sql as search_sql
    from datasette_mapclip.search.query import SearchParams

    path = tmp_path / "common.db"
    shutil.copy(collection[0], path)
    store = MapStore(path)
    conn = store.conn
    model = conn.execute("SELECT id FROM ocr_models").fetchone()[0]
    insert_words(conn, model, [(4, "Cape")] * 3000)
    params = SearchParams.from_args({"q": "survey", "words": "Cape Fear"})
    counts = search_sql.count_word_matches(conn, words_query_terms("Cape Fear"))
    assert counts == {'"Cape"': 3004, '"Fear"': 3}

    def run(word_counts):
        steps = [0]

        def count():
            steps[0] += 1
        conn.set_progress_handler(count, 100)
        sql_params: dict = {}
        found = {row[0] for row in conn.execute(
            search_sql.matching_ids_sql(params, sql_params, word_counts=word_counts), sql_params)}
        conn.set_progress_handler(None, 0)
        return found, steps[0]

    every_term, plain_steps = run(None)
    rarest, driven_steps = run(counts)
    assert rarest == every_term == {2, 3, 5, 7}
    assert driven_steps * 5 < plain_steps, (driven_steps, plain_steps)
    store.close()
