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
