"""The public search page (/-/mapclip) as a visitor meets it: no command-line advice, a link to
"About this search", an empty state that says what to type, labelled controls, and the example
searches a publisher configures."""

from __future__ import annotations

import html
import re
import shutil
import urllib.parse

import pytest

from conftest import load_collection, make_datasette
from datasette_mapclip.store import MapStore

# Advice for whoever runs the server, never for a visitor of the published page.
COMMAND_LINE = re.compile(r"--(pretrained|model|checkpoint|precision|engine|keep-images)\b"
                          r"|\bmapclip (load|import-beto|fine-tune|demo|loc-metadata)\b|`mapclip|pip install")
DEMO_NOTE = ("This demo uses mapclip-tiny, a small CLIP model trained here, so it runs offline. Real collections "
             "use real CLIP weights (--model ViT-B-32 --pretrained openai), which mapclip fetches where the network allows.")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 12)


def text_of(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def config(**settings):
    return {"databases": {"maps": {"plugins": {"datasette-mapclip": settings}}}}


@pytest.mark.parametrize("path", ["/-/mapclip", "/-/mapclip?q=relief+map&k=4", "/-/mapclip?like=1&k=3",
                                  "/-/mapclip?q=", "/-/mapclip?like=99999"])
async def test_the_public_page_gives_no_command_line_advice_and_links_to_about(collection, path):
    # even with a publisher's note that holds command lines (the offline demo's): it belongs on the about page
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"model_note": DEMO_NOTE}}})
    response = await ds.client.get(path)
    assert response.status_code in (200, 404)
    assert not COMMAND_LINE.search(response.text), COMMAND_LINE.search(response.text)
    assert '<a href="/-/mapclip/about?_db=maps" class="mapclip-about-link">About this search</a>' in response.text
    about = await ds.client.get("/-/mapclip/about?_db=maps")
    assert about.status_code == 200 and "This demo uses mapclip-tiny" in about.text


async def test_results_link_to_what_the_scores_mean(collection):
    ds = make_datasette([str(collection[0])])
    page = (await ds.client.get("/-/mapclip?q=relief&k=4")).text
    assert '<a href="/-/mapclip/about?_db=maps#scores">What the scores mean</a>' in page
    about = (await ds.client.get("/-/mapclip/about?_db=maps")).text
    assert 'id="scores"' in about


async def test_operator_errors_reach_a_visitor_in_plain_words(collection, tmp_path, monkeypatch):
    monkeypatch.setenv("MAPCLIP_CHECKPOINT_REGISTRY", "off")  # a server that never saw the weights
    copy = tmp_path / "moved.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    store.conn.execute("UPDATE models SET checkpoint_path = '/nowhere/tiny.pt'")
    store.remove_query_encoders(store.model().name)  # a file without query encoders: it needs the weights
    store.close()
    ds = make_datasette([str(copy)])
    page = await ds.client.get("/-/mapclip?q=relief")
    assert page.status_code == 503
    assert "not available on this site right now" in page.text and "/nowhere" not in page.text
    assert not COMMAND_LINE.search(page.text)
    api = await ds.client.get("/-/mapclip/search.json?q=relief")  # the operator's answer keeps every detail
    assert api.status_code == 503 and "a file named tiny.pt" in api.json()["error"]
    assert "were not found on this server" in api.json()["error"]
    empty = tmp_path / "empty.db"
    MapStore(empty).close()
    page = await make_datasette([str(empty)]).client.get("/-/mapclip")
    assert page.status_code == 400 and "cannot be searched yet" in page.text and not COMMAND_LINE.search(page.text)
    # a visitor's own mistake is still explained as it was
    bad = await ds.client.get("/-/mapclip?like=1&weight=7")
    assert bad.status_code == 400 and "weight must be between -1" in bad.text


async def test_before_any_query_the_page_says_what_to_type(collection):
    ds = make_datasette([str(collection[0])])
    page = (await ds.client.get("/-/mapclip")).text
    words = text_of(page)
    assert "How to search" in words and "Describe what you would see" in words
    assert "“nautical chart with soundings”" in words  # examples of what to type
    assert "mapclip-card" not in page and "mapclip-examples" not in page  # nothing configured, no example row
    assert 'role="status" aria-live="polite"' in page  # where "Searching..." appears
    with_results = (await ds.client.get("/-/mapclip?q=relief&k=4")).text
    assert "How to search" not in with_results


async def test_every_control_has_a_label_and_every_thumbnail_its_title(collection):
    ds = make_datasette([str(collection[0])])
    page = (await ds.client.get("/-/mapclip?q=relief&k=6")).text
    ids = set(re.findall(r'<label[^>]* for="([^"]+)"', page))
    for control in re.finditer(r"<(input|select)\b[^>]*>", page):
        tag = control.group(0)
        if 'type="hidden"' in tag:
            continue
        element_id = re.search(r'id="([^"]+)"', tag)
        wrapped = page.rfind("<label", 0, control.start()) > page.rfind("</label>", 0, control.start())
        assert wrapped or (element_id and element_id.group(1) in ids) or "aria-label=" in tag, tag
    titles = dict(MapStore(collection[0]).conn.execute("SELECT id, title FROM maps").fetchall())
    cards = re.findall(r'data-id="(\d+)">\s*<a class="mapclip-thumb"[^>]*>\s*<img src="[^"]+" alt="([^"]*)"', page)
    assert len(cards) == 6
    assert all(alt == titles[int(map_id)] for map_id, alt in cards), cards


async def test_untitled_maps_get_meaningful_alt_text(collection, tmp_path):
    copy = tmp_path / "untitled.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    store.conn.execute("UPDATE maps SET title = NULL")
    store.close()
    page = (await make_datasette([str(copy)]).client.get("/-/mapclip?like=1&k=3")).text
    assert 'alt="None"' not in page and page.count('alt="Untitled map"') == 3


async def test_example_queries_and_example_map_from_config(collection):
    title = MapStore(collection[0]).conn.execute("SELECT title FROM maps WHERE id = 3").fetchone()[0]
    ds = make_datasette([str(collection[0])], metadata=config(
        example_queries=["nautical chart", "city plan <b>with</b> river", "", 42], example_map=3))
    page = (await ds.client.get("/-/mapclip")).text
    row = re.search(r'<nav class="mapclip-examples".*?</nav>', page, re.S).group(0)
    links = dict((html.unescape(text), html.unescape(href)) for href, text in
                 re.findall(r'<li><a href="([^"]+)">([^<]*)</a></li>', row))
    assert links == {"nautical chart": "/-/mapclip?q=nautical+chart&_db=maps",
                     "city plan <b>with</b> river": "/-/mapclip?q=city+plan+%3Cb%3Ewith%3C%2Fb%3E+river&_db=maps"}
    assert "city plan &lt;b&gt;with&lt;/b&gt; river" in page  # escaped
    example = re.search(r'<a class="mapclip-example-map" href="([^"]+)">.*?Maps that look like “([^”]+)”', row)
    assert example and html.unescape(example.group(1)) == "/-/mapclip?like=3&_db=maps"
    assert html.unescape(example.group(2)) == title
    # one click each: the links are searches that run
    for url in [*links.values(), html.unescape(example.group(1))]:
        response = await ds.client.get(url)
        assert response.status_code == 200 and response.text.count('class="mapclip-card"') == 12, url
    like_page = (await ds.client.get("/-/mapclip?like=3&_db=maps")).text
    assert re.search(r'class="mapclip-card" data-id="3"', like_page)
    # the row stays with the results, so another example is one click away
    assert "mapclip-examples" in (await ds.client.get("/-/mapclip?q=relief")).text


@pytest.mark.parametrize("settings", [
    {},
    {"example_queries": "nautical chart"},  # not a list
    {"example_queries": [], "example_map": 99999},  # no such map
    {"example_map": "abc"},
    {"example_map": 10**30},
    {"example_map": True},
])
async def test_without_usable_examples_the_page_shows_none(collection, settings):
    ds = make_datasette([str(collection[0])], metadata=config(**settings))
    for path in ("/-/mapclip", "/-/mapclip?q=relief&k=2"):
        response = await ds.client.get(path)
        assert response.status_code == 200 and "mapclip-examples" not in response.text


async def test_examples_of_a_collection_the_actor_cannot_view_are_not_shown(collection, tmp_path):
    secret = tmp_path / "secret.db"
    shutil.copy(collection[0], secret)
    ds = make_datasette([str(secret)], metadata={"databases": {"secret": {
        "allow": {"id": "root"}, "plugins": {"datasette-mapclip": {"example_queries": ["hidden treasure"]}}}}})
    response = await ds.client.get("/-/mapclip?" + urllib.parse.urlencode({"_db": "secret"}))
    assert response.status_code == 403 and "hidden treasure" not in response.text
    response = await ds.client.get("/-/mapclip")
    assert "hidden treasure" not in response.text


async def test_a_results_picture_opens_its_map_page(collection):
    """Not the bare thumbnail file: the picture and the title both lead to the map's own page."""
    page = (await make_datasette([str(collection[0])]).client.get("/-/mapclip?q=relief&k=5")).text
    cards = re.findall(r'data-id="(\d+)">\s*<a class="mapclip-thumb" href="([^"]+)"', page)
    assert len(cards) == 5
    assert all(href == f"/-/mapclip/map/maps/{map_id}" for map_id, href in cards), cards


async def test_an_empty_search_says_what_to_do_and_a_refused_one_keeps_the_words(collection):
    ds = make_datasette([str(collection[0])])
    empty = await ds.client.get("/-/mapclip?q=")
    assert empty.status_code == 200 and "Type some words to search for" in text_of(empty.text)
    assert "Type some words" not in text_of((await ds.client.get("/-/mapclip")).text)  # a first visit
    words = "coast " * 250  # past the 1,000-character limit
    refused = await ds.client.get("/-/mapclip?" + urllib.parse.urlencode({"q": words}))
    assert refused.status_code == 400 and "too long" in refused.text
    box = re.search(r'<input type="search" id="mapclip-q" name="q" value="([^"]*)"', refused.text).group(1)
    assert box == words.strip()[:1000]
    reversed_years = await ds.client.get("/-/mapclip/search.json?q=map&year_min=1900&year_max=1850")
    assert reversed_years.status_code == 400 and "wrong way round" in reversed_years.json()["error"]


@pytest.fixture(scope="module")
def two_models(collection, tmp_path_factory):
    """The collection with a second, non-default model (as a fine-tune leaves its start model):
    the same vectors under another name."""
    copy = tmp_path_factory.mktemp("two-models") / "maps.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    default = store.model()
    start = store.register_model({**{k: default[k] for k in ("architecture", "dim", "image_size")},
                                  "name": "start-model", "pretrained": "none"})
    ids, matrix = store.vectors(default.name)
    with store.transaction():
        for map_id, vector in zip(ids, matrix):
            store.write_vector(start, int(map_id), vector)
    store.close()
    return copy, default.name


def model_menu(page: str) -> list[str] | None:
    found = re.search(r'<select name="model">(.*?)</select>', page, re.S)
    return re.findall(r"<option[^>]*>([^<]*)</option>", found.group(1)) if found else None


async def test_the_model_menu_offers_the_default_and_the_publishers_choices_only(two_models):
    db, default = two_models
    plain = (await make_datasette([str(db)]).client.get("/-/mapclip?like=1&k=3")).text
    assert model_menu(plain) is None  # the start model is not offered: one model, no menu
    asked = (await make_datasette([str(db)]).client.get("/-/mapclip?like=1&k=3&model=start-model")).text
    assert model_menu(asked) == [default, "start-model"]  # the model this search asked for is shown
    listed = await make_datasette([str(db)], metadata=config(models_menu=["start-model"])).client.get(
        "/-/mapclip?like=1&k=3")
    assert model_menu(listed.text) == [default, "start-model"]


async def test_links_leave_out_the_default_model(two_models):
    db, default = two_models
    ds = make_datasette([str(db)], metadata=config(models_menu=["start-model"]))
    page = (await ds.client.get(f"/-/mapclip?like=1&k=3&model={urllib.parse.quote(default)}")).text
    links = [html.unescape(href) for href in re.findall(r'href="(/-/mapclip[^"]*)"', page)]
    assert any("like=" in link for link in links)
    assert not [link for link in links if "model=" in link]
    other = (await ds.client.get("/-/mapclip?like=1&k=3&model=start-model")).text
    assert any("model=start-model" in html.unescape(href) for href in re.findall(r'href="(/-/mapclip[^"]*)"', other))
