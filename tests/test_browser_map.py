"""A map's page in a real browser: OpenSeadragon, served by the plugin, opens the image's IIIF
service on the local loc.gov stand-in and draws its tiles; sheets and neighbours lead to their
own pages; nothing is fetched from any other host."""

from __future__ import annotations

import pytest
from test_browser import browser, serve  # noqa: F401 - the shared browser fixture

from datasette_mapclip.store import MapStore


@pytest.fixture(scope="module")
def loc_site(tmp_path_factory, model_args):
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli
    from loc_server import LocServer

    server = LocServer(items=10, per_page=5, sheets={3: 3}).start()
    db_path = tmp_path_factory.mktemp("loc-browser") / "maps.db"
    result = CliRunner().invoke(cli, ["load", "loc", str(db_path), f"{server.url}/collections/test-maps/",
                                      "--rate", "0", *model_args, "--precision", "fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for url, _ in serve(db_path, None):
        yield url, server, db_path
    server.stop()


def is_tile(path: str) -> bool:
    return "/iiif/" in path and "/full/" not in path and path.endswith("/0/default.jpg")


def scale(path: str) -> int:
    """How much a tile request scales its region down: /iiif/<service>/<x,y,w,h>/<w,>/0/default.jpg."""
    region, size = path.split("/")[3:5]
    return round(int(region.split(",")[2]) / int(size.split(",")[0]))


def test_the_deep_zoom_viewer_draws_iiif_tiles_from_the_image_service(loc_site, browser):  # noqa: F811
    url, server, db_path = loc_site
    store = MapStore(db_path)
    sheets = [row[0] for row in store.conn.execute(
        "SELECT id FROM maps WHERE item_id = (SELECT item_id FROM maps GROUP BY item_id HAVING count(*) = 3) "
        "ORDER BY sheet")]
    store.close()
    # narrower than the image: the first view needs only reduced tiles, zooming in the full-size ones
    page = browser.new_page(viewport={"width": 420, "height": 800})
    requested, errors = [], []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    before = len(server.requests)
    page.goto(f"{url}/-/mapclip/map/maps/{sheets[0]}")
    page.wait_for_selector("#mapclip-zoom[data-state=open]", timeout=20_000)
    page.wait_for_function("Number(document.getElementById('mapclip-zoom').dataset.tiles || 0) >= 1", timeout=20_000)
    asked = server.requests[before:]
    assert any(path.endswith("/info.json") for path in asked), asked
    tiles = [scale(path) for path in asked if is_tile(path)]
    assert tiles and min(tiles) >= 2, tiles  # reduced levels first: each tile a region scaled down
    assert page.evaluate("window.mapclipViewer.world.getItemCount()") == 1
    width = page.evaluate("window.mapclipViewer.world.getItemAt(0).source.width")
    assert width == 1200  # the info.json's full size, not a derivative
    # zooming in asks for full-resolution tiles (256 px regions at scale factor 1)
    seen = len(server.requests)
    page.evaluate("window.mapclipViewer.viewport.zoomBy(8); window.mapclipViewer.viewport.applyConstraints()")
    page.wait_for_function("Number(document.getElementById('mapclip-zoom').dataset.tiles) > 2", timeout=20_000)
    page.wait_for_timeout(500)
    deeper = [scale(path) for path in server.requests[seen:] if is_tile(path)]
    assert 1 in deeper, deeper  # full-resolution tiles once zoomed in
    # the viewer and its button images came from the plugin's own static files
    assert any(u.endswith("/-/static-plugins/datasette-mapclip/vendor/openseadragon/openseadragon.min.js")
               for u in requested)
    hosts = {u.split("/")[2] for u in requested if u.startswith("http")}
    assert hosts <= {url.split("/")[2], server.url.split("/")[2]}, hosts
    assert errors == []
    # another sheet of the item, then a neighbour: each opens its own page
    page.click(f".mapclip-strip a[href$='/maps/{sheets[2]}']")
    page.wait_for_url(f"**/-/mapclip/map/maps/{sheets[2]}")
    assert page.locator(".mapclip-strip-this a").get_attribute("aria-current") == "page"
    neighbour = page.locator("#mapclip-near-heading + .mapclip-strip a").first
    target = neighbour.get_attribute("href")
    neighbour.click()
    page.wait_for_url(f"**{target}")
    assert page.locator("h1").inner_text()
    page.close()


def result_ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all(".mapclip-card", "els => els.map(e => e.dataset.id)")]


def test_terms_feedback_export_and_a_map_page_from_the_search_page(loc_site, browser, tmp_path):  # noqa: F811
    """Two text terms with one negative, one-click feedback, the results as CSV, and a result's map page."""
    import csv
    import json
    import urllib.parse
    import urllib.request

    url, server, _ = loc_site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/-/mapclip")
    page.fill("#mapclip-q", "city plan")
    page.fill(".mapclip-term-new input[type=text]", "nautical chart")
    page.click(".mapclip-add-term")
    rows = page.locator(".mapclip-term")
    assert rows.count() == 2
    rows.nth(1).locator("input[type=text]").fill("printed text")
    rows.nth(1).locator("input[type=range]").evaluate(
        "el => { el.value = '-0.8'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
    assert rows.nth(1).locator(".mapclip-term-weight").inner_text() == "-0.8"
    page.click(".mapclip-query button[type=submit]")
    page.wait_for_selector(".mapclip-card")
    args = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
    assert args["q"] == ["city plan"] and args["term"] == ["nautical chart", "printed text"]
    assert args["term_weight"] == ["1", "-0.8"]
    shown = result_ids(page)
    api = json.load(urllib.request.urlopen(page.url.replace("/-/mapclip?", "/-/mapclip/search.json?")))
    assert shown == [r["id"] for r in api["results"]] and api["sql"].count("mapclip_embed_text") == 3
    # the terms survive into the next form: both rows are there, with their weights
    assert page.locator(".mapclip-term input[name=term]").evaluate_all("els => els.map(e => e.value)")[:2] == [
        "nautical chart", "printed text"]

    # one click marks a result "more like this", another marks one "fewer": each a new search
    marked_more, marked_fewer = shown[2], shown[0]
    page.locator(f'.mapclip-card[data-id="{marked_more}"] .mapclip-mark-more').click()
    page.wait_for_url("**more=*")
    page.locator(f'.mapclip-card[data-id="{marked_fewer}"] .mapclip-mark-fewer').click()
    page.wait_for_url("**fewer=*")
    args = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
    assert args["more"] == [str(marked_more)] and args["fewer"] == [str(marked_fewer)]
    refined = result_ids(page)
    assert refined != shown and refined.index(marked_more) <= shown.index(marked_more)
    assert marked_fewer not in refined or refined.index(marked_fewer) >= shown.index(marked_fewer)
    assert "Refining: more like this" in page.locator(f'.mapclip-card[data-id="{marked_more}"]').inner_text()

    # the results as CSV: the same maps in the same order
    with page.expect_download() as download:
        page.click("a.mapclip-export[href*='export.csv']")
    saved = tmp_path / "results.csv"
    download.value.save_as(saved)
    table = list(csv.DictReader(saved.open(encoding="utf-8")))
    assert [int(row["id"]) for row in table] == refined

    # a result's title opens its own page, with the deep-zoom viewer working
    page.locator(".mapclip-card .mapclip-title").first.click()
    page.wait_for_url(f"**/-/mapclip/map/maps/{refined[0]}")
    page.wait_for_selector("#mapclip-zoom[data-state=open]", timeout=20_000)
    page.close()


def test_the_words_read_on_a_map_are_outlined_and_a_matched_word_is_zoomed_to(loc_site, browser):  # noqa: F811
    from datasette_mapclip.store.words import MapWord, WordStore

    url, _, db_path = loc_site
    store = MapStore(db_path)
    map_id = store.conn.execute("SELECT min(id) FROM maps").fetchone()[0]
    words = WordStore(store)
    model = words.register_ocr_model({"engine": "browser-test", "engine_version": "1"})
    hostile = '<img src=x onerror="window.__hacked=1">'
    words.write_reading(map_id, model.id, [MapWord("Cape Fear", 0.9, 0.6, 0.7, 0.1, 0.03),
                                           MapWord(hostile, 0.8, 0.1, 0.1, 0.2, 0.05)])
    wanted = store.conn.execute("SELECT id FROM map_words WHERE map_id = ? AND text = 'Cape Fear'",
                                (map_id,)).fetchone()[0]
    store.close()
    page = browser.new_page(viewport={"width": 900, "height": 900})
    page.goto(f"{url}/-/mapclip/map/maps/{map_id}?word={wanted}")
    page.wait_for_selector("#mapclip-zoom[data-state=open]", timeout=20_000)
    page.wait_for_selector("#mapclip-words[data-outlined='2']", timeout=10_000)
    assert page.locator(".mapclip-word-box").count() == 2
    match = page.locator(".mapclip-word-box.mapclip-word-match")
    assert match.count() == 1 and match.get_attribute("title") == "Cape Fear"
    assert page.evaluate("window.mapclipViewer.viewport.getZoom(true)") > 2  # zoomed in on the word
    center = page.evaluate("(() => { const c = window.mapclipViewer.viewport.getCenter(true); return [c.x, c.y]; })()")
    assert 0.55 < center[0] < 0.75, center
    assert page.locator(".mapclip-word-list li", has_text="Cape Fear").get_attribute("class") == "mapclip-word-match"
    assert page.evaluate("window.__hacked") is None  # the hostile word is text everywhere
    page.close()


@pytest.fixture(scope="module")
def local_site(tmp_path_factory, model_args):
    """A folder load (no IIIF service) with ``maps.db`` beside its ``scans/``."""
    from click.testing import CliRunner

    from conftest import draw_map
    from datasette_mapclip.cli import cli

    root = tmp_path_factory.mktemp("local-browser")
    (root / "scans").mkdir()
    draw_map(4, size=(1800, 1200)).save(root / "scans" / "coast.jpg", "JPEG")
    draw_map(5).save(root / "scans" / "other.jpg", "JPEG")
    result = CliRunner().invoke(cli, ["load", "folder", str(root / "maps.db"), str(root / "scans"), *model_args,
                                      "--precision", "fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for url, _ in serve(root / "maps.db", None):
        yield url, root / "maps.db"


def test_a_local_image_opens_in_the_viewer_and_a_matched_word_is_zoomed_to(local_site, browser):  # noqa: F811
    from datasette_mapclip.store.words import MapWord, WordStore

    url, db_path = local_site
    store = MapStore(db_path)
    map_id = store.conn.execute("SELECT id FROM maps WHERE source_id = 'coast.jpg'").fetchone()[0]
    words = WordStore(store)
    model = words.register_ocr_model({"engine": "browser-test", "engine_version": "1"})
    words.write_reading(map_id, model.id, [MapWord("Cape Fear", 0.9, 0.6, 0.7, 0.1, 0.03),
                                           MapWord("Smith Island", 0.8, 0.1, 0.1, 0.2, 0.05)])
    wanted = store.conn.execute("SELECT id FROM map_words WHERE map_id = ? AND text = 'Cape Fear'",
                                (map_id,)).fetchone()[0]
    store.close()
    page = browser.new_page(viewport={"width": 900, "height": 900})
    requested, errors = [], []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/-/mapclip/map/maps/{map_id}?word={wanted}")
    page.wait_for_selector("#mapclip-zoom[data-state=open]", timeout=20_000)
    page.wait_for_selector("#mapclip-words[data-outlined='2']", timeout=10_000)
    # OpenSeadragon's simple image source, on the plugin's image route, at the file's full size
    assert page.evaluate("window.mapclipViewer.world.getItemAt(0).source.constructor === OpenSeadragon.ImageTileSource")
    assert page.evaluate("window.mapclipViewer.world.getItemAt(0).source.width") == 1800
    assert f"{url}/-/mapclip/image/maps/{map_id}.jpg" in requested
    assert page.locator(".mapclip-map-record dd", has_text="1800 × 1200 px").count() == 1
    match = page.locator(".mapclip-word-box.mapclip-word-match")
    assert match.count() == 1 and match.get_attribute("title") == "Cape Fear"
    assert page.evaluate("window.mapclipViewer.viewport.getZoom(true)") > 2  # zoomed in on the word
    center = page.evaluate("(() => { const c = window.mapclipViewer.viewport.getCenter(true); return [c.x, c.y]; })()")
    assert 0.55 < center[0] < 0.75, center
    hosts = {u.split("/")[2] for u in requested if u.startswith("http")}
    assert hosts == {url.split("/")[2]}, hosts
    assert errors == []
    page.close()
