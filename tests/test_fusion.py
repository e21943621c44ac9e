"""Fused rankings of a query of several terms (``fusion=standardised|rrf``) beside the paper's
vector average: the order equals the same fusion computed again in numpy over every stored vector,
on both search paths; the reported SQL, run in SQLite, gives the same order; filters and paging hold;
one term ranks as before; bad values are 400s that say why."""

from __future__ import annotations

import urllib.parse

import numpy as np
import pytest
from test_plugin import SEARCH_PATHS, wait_for_index

from conftest import load_collection, make_datasette, query_json_path
from datasette_mapclip.search import service
from datasette_mapclip.search import sql as search_sql
from datasette_mapclip.store import MapStore


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 30)


@pytest.fixture(scope="module")
def stored(collection):
    store = MapStore(collection[0])
    ids, matrix = store.vectors()
    years = dict(store.conn.execute("SELECT id, year FROM maps").fetchall())
    store.close()
    return np.asarray(ids), np.asarray(matrix, np.float32), years


@pytest.fixture(params=list(SEARCH_PATHS))
async def ds(collection, request):
    # the reported SQL runs under Datasette's time limit: room for a machine busy with other work
    limit = {"settings": {"sql_time_limit_ms": 30_000}}
    if request.param == "sqlite-vec":
        served = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}},
                                **limit)
    else:
        served = make_datasette([str(collection[0])], **limit)
        await wait_for_index(served)
    served.search_path = request.param
    return served


@pytest.fixture(autouse=True)
def shallow(monkeypatch):
    """A sample smaller than the collection, lists shorter than it: the sample's choice, the deepening
    of the lists and RRF's depth all decide the answer."""
    monkeypatch.setattr(search_sql, "SAMPLE_SIZE", 6)
    monkeypatch.setattr(search_sql, "RRF_DEPTH", 6)
    monkeypatch.setattr(service, "FUSION_START_DEPTH", 1)


def unit(v):
    return v / np.linalg.norm(v)


async def search(ds, pairs):
    return await ds.client.get("/-/mapclip/search.json?" + urllib.parse.urlencode(pairs))


async def run_reported_sql(ds, data):
    response = await ds.client.get(query_json_path(data["database"]) + "?" + urllib.parse.urlencode(
        {"sql": data["sql"], **{k: str(v) for k, v in data["params"].items()}, "_shape": "array"}),
        follow_redirects=True)
    assert response.status_code == 200, response.text[:800]
    return response.json()


def sample_rows(ids, size):
    """The standardising sample, chosen again from its definition: ids scattered by a hash."""
    order = sorted(range(len(ids)), key=lambda i: ((int(ids[i]) % 1000003) * 618034 % 1000003, int(ids[i])))
    return np.array(order[:size])


def passing(ids, years, year_max):
    return np.array([year_max is None or (years[int(i)] is not None and years[int(i)] <= year_max) for i in ids])


def standardised_order(ids, matrix, years, terms, year_max=None):
    """Every map passing the filter scored: sum of weight x (similarity - mean) / deviation over the sample."""
    sample = matrix[sample_rows(ids, search_sql.SAMPLE_SIZE)]
    keep = passing(ids, years, year_max)
    scores = np.zeros(len(ids))
    for vector, weight in terms:
        sims = (sample @ unit(vector)).astype(np.float64)
        mean, deviation = sims.mean(), sims.std()
        scores += weight * ((matrix @ unit(vector)).astype(np.float64) - mean) / deviation
    order = sorted(np.flatnonzero(keep), key=lambda r: (-scores[r], int(ids[r])))
    return [int(ids[r]) for r in order], scores


def rrf_order(ids, matrix, years, terms, depth, year_max=None):
    keep = np.flatnonzero(passing(ids, years, year_max))
    scores: dict[int, float] = {}
    positive = set()
    for vector, weight in terms:
        sims = matrix[keep] @ unit(vector)
        ranked = [int(ids[keep[r]]) for r in np.argsort(-sims, kind="stable")[:depth]]
        for place, map_id in enumerate(ranked, 1):
            scores[map_id] = scores.get(map_id, 0.0) + weight / (10 + place)  # the terms' constant
            if weight > 0:
                positive.add(map_id)
    return sorted(positive, key=lambda m: (-round(scores[m], 12), m))


MIXES = {  # name -> (pairs, terms as (what, weight))
    "text and a map at the middle": ([("q", "nautical chart"), ("like", "5"), ("weight", "0")],
                                     [("nautical chart", 0.5), (5, 0.5)]),
    "text leaning, a map and a negative term": (
        [("q", "nautical chart"), ("like", "9"), ("weight", "0.5"), ("term", "printed text"), ("term_weight", "-0.7")],
        [("nautical chart", 0.75), (9, 0.25), ("printed text", -0.7)]),
    "three maps": ([("term", "map:3"), ("term", "map:17"), ("term", "map:22"), ("term_weight", "1"),
                    ("term_weight", "0.6"), ("term_weight", "0.3")], [(3, 1.0), (17, 0.6), (22, 0.3)]),
    # marks: each set one term, the mean of its maps, with Rocchio's weights (three maps: two alone
    # are equally near their mean, a tie that float rounding breaks differently in sqlite-vec and numpy)
    "text with more and fewer marks": ([("q", "nautical chart"), ("more", "3,9,17"), ("fewer", "12")],
                                       [("nautical chart", 1.0), ((3, 9, 17), 0.75), ((12,), -0.15)]),
}


def term_vectors(terms, ids, matrix, tiny_encoder):
    texts = [t for t, _ in terms if isinstance(t, str)]
    encoded = iter(tiny_encoder.encode_texts(texts)) if texts else iter(())
    row = {int(m): r for r, m in enumerate(ids)}
    return [(next(encoded) if isinstance(t, str) else matrix[[row[m] for m in t]].sum(axis=0)
             if isinstance(t, tuple) else matrix[row[t]], w) for t, w in terms]


@pytest.mark.asyncio
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("year_max", [None, 1818])
async def test_standardised_fusion_ranks_as_numpy_does_over_every_vector(ds, stored, tiny_encoder, mix, year_max):
    ids, matrix, years = stored
    pairs, terms = MIXES[mix]
    filters = [("year_max", str(year_max))] if year_max else []
    want, _ = standardised_order(ids, matrix, years, term_vectors(terms, ids, matrix, tiny_encoder), year_max)
    for k, page in ((1, 1), (2, 1), (3, 1), (8, 1), (8, 2)):  # each page from lists of 1, deepened until certain
        response = await search(ds, [*pairs, *filters, ("fusion", "standardised"), ("k", str(k)), ("page", str(page))])
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["ranking"] == "standardised" and "standardised" in data["searched_with"]
        assert [r["id"] for r in data["results"]] == want[k * (page - 1):k * page], (k, page)
        assert data["params"]["depth"] > 1  # the lists were deepened until the page was certain
        assert [r["id"] for r in await run_reported_sql(ds, data)] == want[k * (page - 1):k * page]


@pytest.mark.asyncio
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("year_max", [None, 1818])
async def test_rrf_fusion_ranks_as_numpy_does(ds, stored, tiny_encoder, mix, year_max):
    ids, matrix, years = stored
    pairs, terms = MIXES[mix]
    filters = [("year_max", str(year_max))] if year_max else []
    want = rrf_order(ids, matrix, years, term_vectors(terms, ids, matrix, tiny_encoder), search_sql.RRF_DEPTH,
                     year_max)
    response = await search(ds, [*pairs, *filters, ("fusion", "rrf"), ("k", "20")])
    assert response.status_code == 200, response.text
    data = response.json()
    assert [r["id"] for r in data["results"]] == want[:20]
    assert all(r["ranks"] and set(r["ranks"]) <= {f"term {n}" for n in range(1, len(terms) + 1)}
               for r in data["results"])
    rows = await run_reported_sql(ds, data)
    assert [r["id"] for r in rows] == want[:20]
    assert all(r["ranks"] for r in rows)  # the SQL shows each map's place in each list too


@pytest.mark.asyncio
async def test_the_fused_ranking_differs_from_the_average(ds, stored, tiny_encoder):
    """The comparison the fusion exists for: it is a ranking of its own, not the average renamed."""
    pairs, _ = MIXES["text leaning, a map and a negative term"]
    average = (await search(ds, [*pairs, ("k", "12")])).json()
    fused = (await search(ds, [*pairs, ("k", "12"), ("fusion", "standardised")])).json()
    assert [r["id"] for r in average["results"]] != [r["id"] for r in fused["results"]]
    assert average["ranking"] == "similarity" and "mapclip_combine" in average["sql"]


@pytest.mark.asyncio
@pytest.mark.parametrize("fusion", ["standardised", "rrf"])
@pytest.mark.parametrize("pairs", [
    [("q", "nautical chart")],
    [("like", "4")],
    [("q", "nautical chart"), ("like", "4"), ("weight", "1")],  # the slider's end: the text alone
    [("q", "nautical chart"), ("like", "4"), ("weight", "-1")],
], ids=["text", "map", "slider at +1", "slider at -1"])
async def test_one_term_ranks_as_it_always_did(ds, fusion, pairs):
    plain = (await search(ds, [*pairs, ("k", "10")])).json()
    fused = (await search(ds, [*pairs, ("k", "10"), ("fusion", fusion)])).json()
    assert [r["id"] for r in fused["results"]] == [r["id"] for r in plain["results"]]
    assert [r["similarity"] for r in fused["results"]] == [r["similarity"] for r in plain["results"]]
    assert fused["sql"] == plain["sql"] and fused["ranking"] == "similarity"


@pytest.mark.asyncio
@pytest.mark.parametrize("pairs,message", [
    ([("q", "chart"), ("fusion", "median")], "fusion must be one of average, standardised, rrf"),
    ([("q", "chart"), ("rank", "best")], "rank must be one of vector, hybrid"),
    ([("like", "3"), ("rank", "hybrid")], "rank=hybrid"),
])
async def test_bad_fusion_and_rank_are_400s_that_say_why(ds, pairs, message):
    response = await search(ds, pairs)
    assert response.status_code == 400
    assert message in response.text


@pytest.mark.asyncio
async def test_the_page_offers_the_fusion_and_keeps_the_choice(ds):
    page = (await ds.client.get("/-/mapclip?q=chart&like=3&fusion=standardised")).text
    assert 'name="fusion"' in page and '<option value="standardised" selected' in page
    fresh = (await ds.client.get("/-/mapclip")).text
    assert '<option value="rrf" selected' in fresh  # the measured default (bench/results/fusion.md)
    assert 'name="rank"' in fresh
    # a page URL without fusion runs the page's default; the paper's average, chosen, stays in its links
    mixed = (await ds.client.get("/-/mapclip?q=chart&like=3")).text
    assert "fusion=rrf" in mixed  # the JSON and export links say which ranking the page ran
    average = (await ds.client.get("/-/mapclip?q=chart&like=3&fusion=average")).text
    assert "fusion=average" in average and '<option value="average" selected' in average


def test_python_and_cli_take_fusion(collection, stored, tiny_encoder, invoke):
    import json

    from datasette_mapclip.search.local import Collection

    ids, matrix, years = stored
    pairs, terms = MIXES["text and a map at the middle"]
    vectors_ = term_vectors(terms, ids, matrix, tiny_encoder)
    with Collection(collection[0], settings={"index": "off"}) as maps:
        found = maps.search("nautical chart", like=5, weight=0, fusion="standardised", k=8)
    assert [r["id"] for r in found["results"]] == standardised_order(ids, matrix, years, vectors_)[0][:8]
    out = invoke(["search", collection[0], "nautical chart", "--like", "5", "--fusion", "rrf", "-k", "8", "--json"])
    want = rrf_order(ids, matrix, years, vectors_, search_sql.RRF_DEPTH)[:8]
    assert [r["id"] for r in json.loads(out.output)["results"]] == want
    bad = invoke(["search", collection[0], "chart", "--like", "5", "--fusion", "median"], expect=2)
    assert "median" in bad.output and "Traceback" not in bad.output
