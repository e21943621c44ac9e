"""Many weighted terms in one query (text, stored maps, uploaded images; negatives subtract) and
relevance feedback ("more like these" / "fewer like these"), through search.json, with the
reported SQL reproducing the combined query on both search paths."""

from __future__ import annotations

import re
import urllib.parse

import numpy as np
import pytest
from test_plugin import SEARCH_PATHS, expected_order, wait_for_index

from conftest import SAME_ORIGIN, csrf_cookies, load_collection, make_datasette
from datasette_mapclip.search import query_vector
from datasette_mapclip.search.query import MAX_FEEDBACK, MAX_TERMS, QueryTerm, SearchParams
from datasette_mapclip.store import MapStore, vectors


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 30)


@pytest.fixture(scope="module")
def stored(collection):
    store = MapStore(collection[0])
    ids, matrix = store.vectors()
    store.close()
    return ids, matrix


@pytest.fixture(params=list(SEARCH_PATHS))
async def ds(collection, request):
    if request.param == "sqlite-vec":
        served = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    else:
        served = make_datasette([str(collection[0])])
        await wait_for_index(served)
    return served


def unit(v):
    return v / np.linalg.norm(v)


async def search(ds, pairs):
    response = await ds.client.get("/-/mapclip/search.json?" + urllib.parse.urlencode(pairs))
    return response


async def sql_ids(ds, data):
    link = urllib.parse.urlsplit(data["sql_url"])
    rows = (await ds.client.get(link.path + ".json?" + link.query + "&_shape=array", follow_redirects=True)).json()
    return [r["id"] for r in rows]


@pytest.mark.asyncio
async def test_two_text_terms_with_a_negative_combine_into_one_query(ds, stored, tiny_encoder):
    ids, matrix = stored
    chart, rose, text = tiny_encoder.encode_texts(["nautical chart", "compass rose", "printed text"])
    query = unit(1.0 * chart + 0.5 * rose - 0.8 * text)
    want, scores = expected_order(matrix, ids, query, 8)
    response = await search(ds, [("term", "nautical chart"), ("term_weight", "1"), ("term", "compass rose"),
                                 ("term_weight", "0.5"), ("term", "printed text"), ("term_weight", "-0.8"), ("k", 8)])
    assert response.status_code == 200, response.text
    data = response.json()
    assert [r["id"] for r in data["results"]] == want
    np.testing.assert_allclose([r["similarity"] for r in data["results"]], scores, atol=1e-3)
    # the subtraction changes the answer: without it the order differs
    plain, _ = expected_order(matrix, ids, unit(chart + 0.5 * rose), 8)
    assert plain != want
    assert data["sql"].count("mapclip_embed_text") == 3 and "mapclip_combine" in data["sql"]
    assert data["params"]["weight_3"] == -0.8
    assert await sql_ids(ds, data) == want  # the reported SQL reproduces the combined query


@pytest.mark.asyncio
async def test_the_simple_query_mixes_with_terms_of_every_kind(ds, stored, tiny_encoder):
    ids, matrix = stored
    county = tiny_encoder.encode_texts(["county map"])[0]
    colour = tiny_encoder.encode_texts(["colour"])[0]
    uploaded = unit(matrix[5] + 0.3 * matrix[9])  # what an uploaded image becomes: a vector
    # q + like with the slider at 0.4: text (1+0.4)/2, image (1-0.4)/2, then the further terms
    query = unit(0.7 * county + 0.3 * matrix[2] - 0.5 * colour + 0.6 * uploaded - 0.2 * matrix[11])
    want, _ = expected_order(matrix, ids, query, 10)
    pairs = [("q", "county map"), ("like", int(ids[2])), ("weight", "0.4"),
             ("term", "colour"), ("term_weight", "-0.5"),
             ("term", "image:" + vectors.encode(uploaded).hex()), ("term_weight", "0.6"),
             ("term", f"map:{int(ids[11])}"), ("term_weight", "-0.2"), ("k", 10)]
    data = (await search(ds, pairs)).json()
    assert [r["id"] for r in data["results"]] == want
    assert await sql_ids(ds, data) == want


@pytest.mark.asyncio
async def test_an_image_minus_a_word_is_a_query_of_its_own(ds, stored, tiny_encoder):
    """A single negative term is not silently flipped back: "minus colour" alone searches away from it."""
    ids, matrix = stored
    colour = tiny_encoder.encode_texts(["colour"])[0]
    data = (await search(ds, [("term", "colour"), ("term_weight", "-1"), ("k", 5)])).json()
    assert [r["id"] for r in data["results"]] == expected_order(matrix, ids, -colour, 5)[0]
    assert await sql_ids(ds, data) == [r["id"] for r in data["results"]]


@pytest.mark.asyncio
async def test_feedback_moves_the_query_toward_more_and_away_from_fewer(ds, stored, tiny_encoder):
    ids, matrix = stored
    text = tiny_encoder.encode_texts(["survey"])[0]
    more, fewer = [int(ids[4]), int(ids[17])], [int(ids[8])]
    expected = unit(query_vector.FEEDBACK_QUERY * unit(text)
                    + query_vector.FEEDBACK_MORE * (matrix[4] + matrix[17]) / 2
                    - query_vector.FEEDBACK_FEWER * matrix[8])
    want, _ = expected_order(matrix, ids, expected, 10)
    data = (await search(ds, [("q", "survey"), ("more", ",".join(map(str, more))), ("fewer", fewer[0]),
                              ("k", 10)])).json()
    assert [r["id"] for r in data["results"]] == want
    before = expected_order(matrix, ids, text, len(ids))[0]
    after = [r["id"] for r in data["results"]]
    # each marked "more" map rises (or stays first), the "fewer" one sinks
    for marked in more:
        assert marked in after and after.index(marked) <= before.index(marked)
    assert fewer[0] not in after or after.index(fewer[0]) >= before.index(fewer[0])
    assert await sql_ids(ds, data) == want
    # the next page keeps the feedback in its URL
    assert "more=" in data["next"] and "fewer=" in data["next"]


@pytest.mark.asyncio
async def test_feedback_alone_is_more_like_these(ds, stored):
    ids, matrix = stored
    data = (await search(ds, [("more", f"{int(ids[1])},{int(ids[2])}"), ("k", 4)])).json()
    assert [r["id"] for r in data["results"]] == expected_order(matrix, ids, unit(matrix[1] + matrix[2]), 4)[0]
    assert "mapclip_embed" not in data["sql"]  # no model run


@pytest.mark.asyncio
@pytest.mark.parametrize("pairs, status, message", [
    ([("term", "a"), ("term", "b"), ("term_weight", "1")], 400, "2 term values but 1 term_weight"),
    ([("term", "a"), ("term_weight", "2")], 400, "term_weight 1 must be between -1 and 1"),
    ([("term", "a"), ("term_weight", "nan")], 400, "between -1 and 1"),
    ([("term", "a"), ("term_weight", "heavy")], 400, "must be a number"),
    ([("term", "x")] * (MAX_TERMS + 1), 400, f"at most {MAX_TERMS}"),
    ([("term", "image:abc")], 400, "hex-encoded float32"),
    ([("term", "image:" + "00" * 8)], 400, "image term 1 has 2 floats"),
    ([("term", "image:" + np.full(64, np.nan, np.float32).tobytes().hex())], 400, "NaN"),
    ([("term", "x" * 1001)], 400, "too long"),
    ([("term", "map:999999")], 404, "map 999999 has no vector"),
    ([("more", ",".join(str(i) for i in range(1, MAX_FEEDBACK + 2)))], 400, f"at most {MAX_FEEDBACK}"),
    ([("more", "1,x")], 400, "comma-separated map ids"),
    ([("q", "a"), ("more", "1"), ("fewer", "1")], 400, "both more and fewer"),
    ([("fewer", "1")], 400, "give q"),
    ([("term", "a"), ("term_weight", "0")], 400, "cancel out"),
])
async def test_bad_terms_and_feedback_are_4xx_that_say_why(ds, pairs, status, message):
    response = await search(ds, pairs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_terms_and_feedback_survive_the_url_round_trip():
    params = SearchParams.from_args({"q": "chart", "weight": "0.2", "term": ["compass rose", "map:12", "image:0000803f"],
                                     "term_weight": ["0.5", "-1", "0.25"], "more": "3, 4,3", "fewer": "9"})
    assert params.terms == (QueryTerm("text", "compass rose", 0.5), QueryTerm("map", 12, -1.0),
                            QueryTerm("image", bytes.fromhex("0000803f"), 0.25))
    assert params.more == (3, 4) and params.fewer == (9,)
    again = SearchParams.from_args(urllib.parse.parse_qs(params.query_string()))
    assert again == params
    # a form row left empty is ignored; terms without weights weigh 1
    assert SearchParams.from_args({"term": ["a", " "]}).terms == (QueryTerm("text", "a", 1.0),)
    # the paper's simple case is unchanged: no terms, the slider's own weights
    simple = SearchParams.from_args({"q": "chart", "like": "3", "weight": "-0.5"})
    assert simple.is_simple and [t.weight for t in simple.all_terms()] == [0.25, 0.75]


def multipart_pairs(pairs: list[tuple[str, str]], image: bytes) -> tuple[bytes, str]:
    boundary = "----mapclipterms"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                    for name, value in pairs)
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="map.jpg"\r\n'
             "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.asyncio
async def test_an_uploaded_image_minus_a_word_posted_from_the_form(ds, stored, tiny_encoder):
    """The form posts its term rows as repeated fields; the redirect keeps every one, in order."""
    import io
    import re

    from conftest import draw_map
    from datasette_mapclip.model.images import open_image

    ids, matrix = stored
    picture = io.BytesIO()
    draw_map(4321).save(picture, "JPEG", quality=92)
    page = await ds.client.get("/-/mapclip")
    token = re.search(r'name="csrftoken" value="([^"]+)"', page.text).group(1)
    body, content_type = multipart_pairs([("csrftoken", token), ("q", ""), ("term", "colour"), ("term_weight", "-0.7"),
                                          ("term", "roads"), ("term_weight", "0.2"), ("k", "6"),
                                          ("fusion", "average")], picture.getvalue())
    response = await ds.client.post("/-/mapclip", content=body, headers={"content-type": content_type, **SAME_ORIGIN},
                                    cookies=csrf_cookies(page))
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    args = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert args["term"] == ["colour", "roads"] and args["term_weight"] == ["-0.7", "0.2"]
    image = tiny_encoder.encode_images([open_image(picture.getvalue(), min_size=tiny_encoder.image_size)])[0]
    colour, roads = tiny_encoder.encode_texts(["colour", "roads"])
    want, _ = expected_order(matrix, ids, unit(unit(image) - 0.7 * colour + 0.2 * roads), 6)
    data = (await ds.client.get(location.replace("/-/mapclip?", "/-/mapclip/search.json?"))).json()
    assert [r["id"] for r in data["results"]] == want


@pytest.mark.asyncio
async def test_the_page_keeps_every_term_and_offers_one_more(ds, stored):
    ids, _ = stored
    query = urllib.parse.urlencode([("q", "county map"), ("term", "compass rose"), ("term_weight", "0.5"),
                                    ("term", f"map:{int(ids[3])}"), ("term_weight", "-0.3")])
    page = await ds.client.get(f"/-/mapclip?{query}")
    assert page.status_code == 200
    html = page.text
    assert 'name="term" value="compass rose"' in html and 'value="0.5"' in html
    assert f'name="term" value="map:{int(ids[3])}"' in html and "map #" in html and 'value="-0.3"' in html
    assert html.count('name="term"') == 3  # the two terms and one empty row for a new one
    # each term's "Remove" drops only that term
    removes = re.findall(r'href="([^"]+)" class="mapclip-clear">Remove<span class="visually-hidden"> term', html)
    first = urllib.parse.parse_qs(urllib.parse.urlsplit(removes[0].replace("&amp;", "&")).query)
    assert first["term"] == [f"map:{int(ids[3])}"] and first["term_weight"] == ["-0.3"] and first["q"] == ["county map"]


@pytest.mark.asyncio
async def test_one_click_marks_a_result_for_feedback_and_a_second_click_undoes_it(ds):
    page = (await ds.client.get("/-/mapclip?q=survey&k=6&fewer=2")).text
    cards = re.findall(r'<li class="mapclip-card" data-id="(\d+)">', page)
    assert len(cards) == 6
    target = int(cards[1])
    more_link = re.search(r'class="mapclip-mark-more[^"]*" href="([^"]+)">[^<]*<span class="visually-hidden">',
                          page.split(f'data-id="{target}"', 1)[1]).group(1).replace("&amp;", "&")
    args = urllib.parse.parse_qs(urllib.parse.urlsplit(more_link).query)
    assert args["more"] == [str(target)] and args["fewer"] == ["2"] and args["q"] == ["survey"]
    marked = (await ds.client.get(more_link)).text
    assert "Refining: more like this (undo)" in marked and "Refined by your marks:" in marked
    undo = re.search(r'class="mapclip-mark-more mapclip-marked" href="([^"]+)"', marked).group(1).replace("&amp;", "&")
    assert "more=" not in undo and "fewer=2" in undo


@pytest.mark.asyncio
async def test_each_mark_is_listed_with_its_own_undo_even_when_its_map_left_the_page(ds):
    """A map marked "fewer" is pushed off the results: its mark stays listed, and undoing it keeps
    every other mark."""
    page = (await ds.client.get("/-/mapclip?q=survey&k=3&more=4&fewer=2,5")).text
    state = page.split('class="mapclip-feedback-state"', 1)[1].split("</div>", 1)[0]
    undos = {}
    for kind, map_id, href in re.findall(r'<li>(more|fewer) like <a href="[^"]+">map #(\d+)</a> <a href="([^"]+)"', state):
        undos[(kind, int(map_id))] = urllib.parse.parse_qs(urllib.parse.urlsplit(href.replace("&amp;", "&")).query)
    assert set(undos) == {("more", 4), ("fewer", 2), ("fewer", 5)}
    assert undos[("fewer", 2)].get("fewer") == ["5"] and undos[("fewer", 2)]["more"] == ["4"]
    assert "more" not in undos[("more", 4)] and undos[("more", 4)]["fewer"] == ["2,5"]
    assert "Clear all marks" in state


def test_a_mark_moves_a_map_between_more_and_fewer_and_keeps_the_latest_marks():
    from datasette_mapclip.web.views import marked

    params = SearchParams.from_args({"q": "x", "more": "1,2", "fewer": "3"})
    assert marked(params, "more", 3) == {"more": (1, 2, 3), "fewer": ()}
    assert marked(params, "fewer", 1) == {"more": (2,), "fewer": (3, 1)}
    assert marked(params, "more", 2) == {"more": (1,), "fewer": (3,)}
    full = SearchParams.from_args({"q": "x", "more": ",".join(str(i) for i in range(1, MAX_FEEDBACK + 1))})
    assert marked(full, "more", 999)["more"] == tuple(range(2, MAX_FEEDBACK + 1)) + (999,)


@pytest.mark.asyncio
async def test_results_link_to_their_map_page_and_offer_the_exports(ds):
    page = (await ds.client.get("/-/mapclip?q=survey&k=4&term=roads&term_weight=-0.5")).text
    cards = re.findall(r'<li class="mapclip-card" data-id="(\d+)">', page)
    for map_id in cards:
        assert f'class="mapclip-title" href="/-/mapclip/map/maps/{map_id}"' in page
    export = re.search(r'href="(/-/mapclip/export\.csv\?[^"]+)"', page).group(1).replace("&amp;", "&")
    table = (await ds.client.get(export)).text.splitlines()
    assert [line.split(",")[1] for line in table[1:]] == cards


# The slider at weights other than 0 (where swapping the text and image weights changes the query),
# with a stored map (like), a vector (what an uploaded image becomes) or a posted image, alone and
# with further terms and feedback.  (name, image kind, slider, further terms, more rows, fewer rows)
SLIDER_CASES = [
    ("like-0.5", "like", 0.5, [], [], []),
    ("like--0.6", "like", -0.6, [], [], []),
    ("vector-0.5", "vector", 0.5, [], [], []),
    ("vector--0.6", "vector", -0.6, [], [], []),
    ("upload-0.5", "upload", 0.5, [], [], []),
    ("like--0.6-terms-feedback", "like", -0.6, [("colour", -0.5)], [4, 17], [8]),
    ("vector-0.5-terms-feedback", "vector", 0.5, [("map", 11, 0.4), ("roads", 0.3)], [6], [13]),
]


def slider_query(text, image, slider, extra, more, fewer, *, swapped=False):
    """The query the search should run, from the vectors alone (the arithmetic written out again)."""
    text_weight, image_weight = (1 + slider) / 2, (1 - slider) / 2
    if swapped:
        text_weight, image_weight = image_weight, text_weight
    query = unit(text_weight * unit(text) + image_weight * unit(image) + sum(w * unit(v) for v, w in extra))
    if more or fewer:
        query = unit(query_vector.FEEDBACK_QUERY * query
                     + (query_vector.FEEDBACK_MORE * np.mean(more, axis=0) if more else 0)
                     - (query_vector.FEEDBACK_FEWER * np.mean(fewer, axis=0) if fewer else 0))
    return query


async def run_reported_sql(ds, data):
    """The reported ``sql`` with its ``params``, run through Datasette's own SQL API."""
    from conftest import query_json_path

    response = await ds.client.get(query_json_path(data["database"]) + "?" + urllib.parse.urlencode(
        {"sql": data["sql"], **{k: str(v) for k, v in data["params"].items()}, "_shape": "array"}),
        follow_redirects=True)
    assert response.status_code == 200, response.text[:500]
    return [r["id"] for r in response.json()]


@pytest.mark.asyncio
@pytest.mark.parametrize("name, image_kind, slider, terms, more_rows, fewer_rows", SLIDER_CASES,
                         ids=[case[0] for case in SLIDER_CASES])
async def test_the_reported_sql_weighs_text_and_image_as_the_search_does(ds, stored, tiny_encoder, name, image_kind,
                                                                         slider, terms, more_rows, fewer_rows):
    import html

    from test_plugin import jpeg, multipart

    from conftest import draw_map
    from datasette_mapclip.model.images import open_image

    ids, matrix = stored
    text = tiny_encoder.encode_texts(["county map"])[0]
    pairs = [("q", "county map"), ("weight", str(slider)), ("k", "10")]
    picture = None
    if image_kind == "like":
        image = matrix[2]
        pairs.append(("like", int(ids[2])))
    elif image_kind == "vector":
        image = unit(matrix[5] + 0.3 * matrix[9])
        pairs.append(("vector", vectors.encode(image).hex()))
    else:
        picture = jpeg(draw_map(777))
        image = tiny_encoder.encode_images([open_image(picture, min_size=tiny_encoder.image_size)])[0]
    extra = []
    for term in terms:
        if term[0] == "map":
            extra.append((matrix[term[1]], term[2]))
            pairs += [("term", f"map:{int(ids[term[1]])}"), ("term_weight", str(term[2]))]
        else:
            extra.append((tiny_encoder.encode_texts([term[0]])[0], term[1]))
            pairs += [("term", term[0]), ("term_weight", str(term[1]))]
    if more_rows:
        pairs.append(("more", ",".join(str(int(ids[i])) for i in more_rows)))
    if fewer_rows:
        pairs.append(("fewer", ",".join(str(int(ids[i])) for i in fewer_rows)))
    more, fewer = [matrix[i] for i in more_rows], [matrix[i] for i in fewer_rows]
    want, _ = expected_order(matrix, ids, slider_query(text, image, slider, extra, more, fewer), 10)
    swapped, _ = expected_order(matrix, ids, slider_query(text, image, slider, extra, more, fewer, swapped=True), 10)
    assert swapped != want  # the case tells the two weights apart

    if picture is None:
        response = await search(ds, pairs)
    else:
        body, content_type = multipart(dict(pairs), picture)
        response = await ds.client.post("/-/mapclip/search.json", content=body,
                                        headers={"content-type": content_type})
    assert response.status_code == 200, response.text[:500]
    data = response.json()
    assert [r["id"] for r in data["results"]] == want
    assert await run_reported_sql(ds, data) == want  # the sql key, run as it stands
    assert await sql_ids(ds, data) == want  # and the sql_url, followed
    if picture is None:  # the page's "View and edit the SQL" link (the page's own default is rrf)
        page = await ds.client.get("/-/mapclip?" + urllib.parse.urlencode([*pairs, ("fusion", "average")]))
        assert page.status_code == 200
        cards = [int(i) for i in re.findall(r'<li class="mapclip-card" data-id="(\d+)">', page.text)]
        assert cards == want
        href = html.unescape(re.search(r'<a href="([^"]+)">View and edit the SQL</a>', page.text).group(1))
        link = urllib.parse.urlsplit(href)
        rows = (await ds.client.get(link.path + ".json?" + link.query + "&_shape=array",
                                    follow_redirects=True)).json()
        assert [r["id"] for r in rows] == want


@pytest.mark.asyncio
@pytest.mark.parametrize("k", [30, 29, 7])
async def test_the_last_page_has_no_next_link_and_every_page_says_which_maps_it_shows(ds, k):
    """30 maps: a page is offered only when it has maps on it, on both search paths."""
    pages, page_number = [], 1
    while True:
        data = (await ds.client.get(f"/-/mapclip/search.json?q=survey&k={k}&page={page_number}")).json()
        html = (await ds.client.get(f"/-/mapclip?q=survey&k={k}&page={page_number}")).text
        pages.append([r["id"] for r in data["results"]])
        first = k * (page_number - 1) + 1
        heading = re.search(r'id="mapclip-results-heading"[^>]*>([^<]*)</h2>', html).group(1)
        assert heading.startswith(f"Maps {first}&ndash;{first + len(pages[-1]) - 1}")
        assert data["searched"] in (None, 30) and (data["searched"] is None or " of 30" in heading)
        assert ("mapclip-next" in html) == (data["next"] is not None)
        if data["next"] is None:
            break
        page_number += 1
    assert [len(p) for p in pages] == [min(k, 30 - k * i) for i in range(-(-30 // k))]
    assert len({i for p in pages for i in p}) == 30
    beyond = (await ds.client.get(f"/-/mapclip?q=survey&k={k}&page={page_number + 1}")).text
    assert f"no maps on page {page_number + 1}" in beyond and "Back to the first page" in beyond


@pytest.mark.asyncio
async def test_the_page_ranks_mixed_terms_by_its_measured_default_and_the_api_by_the_average(ds):
    """A page URL without fusion runs the page's default (rrf, bench/results/fusion.md); search.json
    without it keeps the paper's average, so URLs made before mean what they meant."""
    pairs = [("q", "county map"), ("like", "3"), ("k", "10")]
    page = (await ds.client.get("/-/mapclip?" + urllib.parse.urlencode(pairs))).text
    cards = [int(i) for i in re.findall(r'<li class="mapclip-card" data-id="(\d+)">', page)]
    rrf = (await search(ds, [*pairs, ("fusion", "rrf")])).json()
    average = (await search(ds, pairs)).json()
    assert cards == [r["id"] for r in rrf["results"]]
    assert average["ranking"] == "similarity" and rrf["ranking"] == "rrf"
    assert [r["id"] for r in average["results"]] != cards
