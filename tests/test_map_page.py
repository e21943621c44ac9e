"""A map's own page (record, deep zoom over IIIF, other sheets, nearest neighbours, citations),
and exporting a result set as CSV and JSON: through the real app, on a collection loaded from the
local loc.gov stand-in."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import shutil
import urllib.parse

import pytest

from conftest import make_datasette
from datasette_mapclip.store import MapStore
from datasette_mapclip.web import vendor


@pytest.fixture(scope="module")
def loc_collection(tmp_path_factory, model_args):
    """14 maps from the stand-in: item 2 has three sheets; the stand-in stays up for deep zoom."""
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli
    from loc_server import LocServer

    server = LocServer(items=12, per_page=6, sheets={2: 3}).start()
    db_path = tmp_path_factory.mktemp("loc-maps") / "maps.db"
    result = CliRunner().invoke(cli, ["load", "loc", str(db_path), f"{server.url}/collections/test-maps/",
                                      "--rate", "0", *model_args, "--precision", "fp32"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    yield db_path, server
    server.stop()


@pytest.fixture
def ds(loc_collection):
    return make_datasette([str(loc_collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})


def rows(db_path, sql, params=()):
    store = MapStore(db_path)
    try:
        return store.conn.execute(sql, params).fetchall()
    finally:
        store.close()


@pytest.mark.asyncio
async def test_the_map_json_has_the_record_deep_zoom_sheets_neighbours_and_citations(ds, loc_collection):
    db_path, server = loc_collection
    (map_id, item_id, image_url, title), = rows(db_path, "SELECT id, item_id, image_url, title FROM maps "
                                                          "WHERE item_id = (SELECT item_id FROM maps GROUP BY item_id "
                                                          "HAVING count(*) = 3) ORDER BY sheet LIMIT 1 OFFSET 1")
    response = await ds.client.get(f"/-/mapclip/map/maps/{map_id}.json")
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["map"]["id"] == map_id and data["map"]["title"] == title and data["map"]["item_id"] == item_id
    service = image_url.rsplit("/full/", 1)[0]
    assert data["deep_zoom"]["info_url"] == f"{service}/info.json"
    assert urllib.parse.urlsplit(server.url).netloc in data["deep_zoom"]["hosts"]  # loaded from there
    sheets = data["sheets"]
    assert len(sheets) == 3 and [s["this"] for s in sheets] == [False, True, False]
    assert [s["id"] for s in sheets] == [r[0] for r in rows(db_path, "SELECT id FROM maps WHERE item_id = ? "
                                                                      "ORDER BY sheet", (item_id,))]
    # the neighbours are the "more like this" search, without the map itself
    like = (await ds.client.get(f"/-/mapclip/search.json?like={map_id}&k=13")).json()["results"]
    assert [n["id"] for n in data["neighbours"]] == [r["id"] for r in like if r["id"] != map_id][:12]
    assert len(data["neighbours"]) == 12
    assert title in data["cite"]["text"] and data["map"]["url"] in data["cite"]["text"]
    assert data["cite"]["csl_json"]["type"] == "map"


@pytest.mark.asyncio
async def test_the_map_page_serves_the_viewer_from_the_plugin_itself(ds, loc_collection):
    db_path, _ = loc_collection
    map_id = rows(db_path, "SELECT id FROM maps ORDER BY id LIMIT 1")[0][0]
    page = await ds.client.get(f"/-/mapclip/map/maps/{map_id}")
    assert page.status_code == 200
    script = re.search(r'<script src="([^"]*openseadragon\.min\.js)"', page.text).group(1)
    assert script == "/-/static-plugins/datasette-mapclip/vendor/openseadragon/openseadragon.min.js"
    served = await ds.client.get(script)
    assert served.status_code == 200 and served.text.lstrip().startswith("//! openseadragon")
    licence = await ds.client.get(script.replace("openseadragon.min.js", "LICENSE.txt"))
    assert licence.status_code == 200 and "Redistribution and use" in licence.text
    # no script or stylesheet from any other host
    assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', page.text)
    assert 'id="mapclip-zoom"' in page.text and "/info.json" in page.text
    assert "Maps that look like this one" in page.text and "Cite this map" in page.text


@pytest.mark.asyncio
async def test_citation_files_download(ds, loc_collection):
    db_path, _ = loc_collection
    map_id, title = rows(db_path, "SELECT id, title FROM maps ORDER BY id LIMIT 1")[0]
    bib = await ds.client.get(f"/-/mapclip/map/maps/{map_id}.bib")
    assert bib.status_code == 200 and bib.headers["content-type"].startswith("application/x-bibtex")
    assert bib.text.startswith("@misc{") and "attachment" in bib.headers["content-disposition"]
    csl = await ds.client.get(f"/-/mapclip/map/maps/{map_id}.csl.json")
    assert json.loads(csl.text)[0]["title"].startswith(title)
    text = await ds.client.get(f"/-/mapclip/map/maps/{map_id}.txt")
    assert title in text.text and "Map." in text.text


@pytest.mark.asyncio
async def test_a_hostile_record_is_escaped_and_never_linked(loc_collection, tmp_path):
    db_path, _ = loc_collection
    copy = tmp_path / "maps.db"
    shutil.copy(db_path, copy)
    store = MapStore(copy)
    with store.transaction():
        store.conn.execute("UPDATE maps SET title = ?, item_url = 'javascript:alert(1)', "
                           "image_url = 'data:text/html,x', notes = ? WHERE id = 1",
                           ('<script>alert("t")</script>', "<img src=x onerror=alert(2)>"))
    store.close()
    ds = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    page = await ds.client.get("/-/mapclip/map/maps/1")
    assert page.status_code == 200
    assert '<script>alert("t")' not in page.text and "&lt;script&gt;" in page.text
    assert "<img src=x" not in page.text and "javascript:" not in page.text and "data:text" not in page.text
    assert 'id="mapclip-zoom"' not in page.text  # no IIIF service: the thumbnail instead
    thumbnail = rows(copy, "SELECT thumbnail_url FROM maps WHERE id = 1")[0][0]
    assert f'class="mapclip-map-thumbnail" src="{thumbnail}"' in page.text


@pytest.mark.asyncio
async def test_missing_maps_and_collections_are_404_and_private_ones_403(loc_collection):
    db_path, _ = loc_collection
    ds = make_datasette([str(db_path)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    for path in ("/-/mapclip/map/maps/999999", "/-/mapclip/map/nope/1", f"/-/mapclip/map/maps/{2**63}",
                 "/-/mapclip/map/maps/999999.json", "/-/mapclip/map/maps/999999.bib"):
        response = await ds.client.get(path)
        assert response.status_code == 404, (path, response.status_code)
    private = make_datasette([str(db_path)], metadata={"databases": {"maps": {"allow": {"id": "librarian"}}},
                                                  "plugins": {"datasette-mapclip": {"index": "off"}}})
    for path in ("/-/mapclip/map/maps/1", "/-/mapclip/map/maps/1.json", "/-/mapclip/map/maps/1.bib",
                 "/-/mapclip/export.csv?q=map&_db=maps"):
        response = await private.client.get(path)
        assert response.status_code == 403, (path, response.status_code)
    cookie = {"ds_actor": private.sign({"a": {"id": "librarian"}}, "actor")}
    assert (await private.client.get("/-/mapclip/map/maps/1.json", cookies=cookie)).status_code == 200


@pytest.mark.asyncio
async def test_results_export_as_csv_and_json_with_the_same_fields(ds):
    query = urllib.parse.urlencode([("q", "city plan"), ("term", "nautical chart"), ("term_weight", "-0.5"),
                                    ("k", "7"), ("page", "2")])
    shown = (await ds.client.get(f"/-/mapclip/search.json?{query}")).json()["results"]
    as_csv = await ds.client.get(f"/-/mapclip/export.csv?{query}")
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert 'filename="mapclip-maps-results.csv"' in as_csv.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in shown] and len(table) == 7
    assert [int(r["rank"]) for r in table] == list(range(8, 15))  # page 2 of 7
    as_json = (await ds.client.get(f"/-/mapclip/export.json?{query}")).json()
    assert [r["id"] for r in as_json["rows"]] == [r["id"] for r in shown]
    assert list(as_json["rows"][0]) == as_json["fields"] == list(table[0])
    assert as_json["rows"][0]["title"] == table[0]["title"] == shown[0]["title"]
    assert (await ds.client.get("/-/mapclip/export.csv")).status_code == 400
    bad = await ds.client.get("/-/mapclip/export.json?term=a&term_weight=7")
    assert bad.status_code == 400 and "between -1 and 1" in bad.json()["error"]


@pytest.mark.asyncio
async def test_every_result_links_to_its_map_page(ds):
    results = (await ds.client.get("/-/mapclip/search.json?q=map&k=3")).json()["results"]
    assert all(r["map_url"] == f"/-/mapclip/map/maps/{r['id']}" for r in results)


def test_the_viewer_is_fetched_pinned_and_checked(tmp_path):
    """The build's fetch refuses a tarball that is not the registry's published one, and keeps
    only the viewer, its images and its licence."""
    import tarfile

    assert vendor.openseadragon_present(), "run: python -m datasette_mapclip.web.vendor (make install does)"
    forged = io.BytesIO()
    with tarfile.open(fileobj=forged, mode="w:gz") as archive:
        data = b"alert('not openseadragon')"
        info = tarfile.TarInfo("package/build/openseadragon/openseadragon.min.js")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(vendor.VendorError, match="does not match"):
        vendor.unpack_openseadragon(forged.getvalue(), tmp_path / "osd")
    assert not (tmp_path / "osd").exists()
    kept = sorted(p.relative_to(vendor.OPENSEADRAGON_DIR).as_posix() for p in vendor.OPENSEADRAGON_DIR.rglob("*")
                  if p.is_file())
    assert {"openseadragon.min.js", "LICENSE.txt", "VERSION"} <= set(kept)
    assert all(k in ("openseadragon.min.js", "LICENSE.txt", "VERSION") or
               (k.startswith("images/") and k.endswith(".png")) for k in kept)


def with_image_url(db_path, folder, image_url, map_id=1):
    copy = folder / "maps.db"
    shutil.copy(db_path, copy)
    store = MapStore(copy)
    with store.transaction():
        store.conn.execute("UPDATE maps SET image_url = ? WHERE id = ?", (image_url, map_id))
        store.conn.execute("UPDATE maps SET image_url = ? WHERE id = 3", (LOC_IMAGE,))
    store.close()
    return copy


LOC_IMAGE = "https://tile.loc.gov/image-services/iiif/service:gmd:gmd370:g3700:ct000001/full/pct:25/0/default.jpg"


OTHER_HOST = "https://iiif.elsewhere.example/iiif/2/abc/full/pct:100/0/default.jpg"


@pytest.mark.asyncio
async def test_the_viewer_opens_only_image_services_on_allowed_hosts(loc_collection, tmp_path):
    db_path, server = loc_collection
    copy = with_image_url(db_path, tmp_path, OTHER_HOST)
    ds = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    elsewhere = await ds.client.get("/-/mapclip/map/maps/1")
    assert elsewhere.status_code == 200
    assert "iiif.elsewhere.example/iiif/2/abc/info.json" not in elsewhere.text
    assert 'id="mapclip-zoom"' not in elsewhere.text and 'class="mapclip-map-thumbnail"' in elsewhere.text
    assert (await ds.client.get("/-/mapclip/map/maps/1.json")).json()["deep_zoom"] is None
    # a map on the host the collection was loaded from still opens, with the allowed hosts for its tiles
    loaded = await ds.client.get("/-/mapclip/map/maps/2")
    assert 'id="mapclip-zoom"' in loaded.text
    hosts = json.loads(html.unescape(re.search(r"data-iiif-hosts='([^']*)'", loaded.text).group(1)))
    assert urllib.parse.urlsplit(server.url).netloc in hosts and "loc.gov" in hosts
    assert "iiif.elsewhere.example" not in hosts
    # and so does one of the Library of Congress's image services
    zoom = (await ds.client.get("/-/mapclip/map/maps/3.json")).json()["deep_zoom"]
    assert zoom["info_url"] == "https://tile.loc.gov/image-services/iiif/service:gmd:gmd370:g3700:ct000001/info.json"


@pytest.mark.asyncio
async def test_the_iiif_hosts_setting_replaces_the_default_hosts(loc_collection, tmp_path):
    db_path, server = loc_collection
    copy = with_image_url(db_path, tmp_path, OTHER_HOST)
    ds = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {
        "index": "off", "iiif_hosts": ["elsewhere.example"]}}})
    allowed = (await ds.client.get("/-/mapclip/map/maps/1.json")).json()["deep_zoom"]
    assert allowed == {"info_url": "https://iiif.elsewhere.example/iiif/2/abc/info.json", "hosts": ["elsewhere.example"]}
    page = await ds.client.get("/-/mapclip/map/maps/1")
    assert 'data-info-url="https://iiif.elsewhere.example/iiif/2/abc/info.json"' in page.text
    # the stand-in the maps were loaded from is no longer allowed
    assert (await ds.client.get("/-/mapclip/map/maps/2.json")).json()["deep_zoom"] is None


@pytest.mark.parametrize("url,allowed,expected", [
    ("https://tile.loc.gov/x/info.json", ["loc.gov"], True),
    ("https://loc.gov.evil.example/x/info.json", ["loc.gov"], False),
    ("https://evilloc.gov/x/info.json", ["loc.gov"], False),
    ("http://127.0.0.1:8182/x/info.json", ["127.0.0.1:8182"], True),
    ("http://127.0.0.1:9999/x/info.json", ["127.0.0.1:8182"], False),
    ("https://images.example.org:443/x/info.json", ["images.example.org"], True),
    ("https://user@elsewhere.example/x/info.json", ["loc.gov"], False),
    ("javascript:alert(1)//loc.gov", ["loc.gov"], False),
    ("https://tile.loc.gov:99999/x", ["loc.gov"], False),
])
def test_host_allowed(url, allowed, expected):
    from datasette_mapclip.model import iiif

    assert iiif.host_allowed(url, allowed) is expected
