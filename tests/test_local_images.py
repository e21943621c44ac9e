"""A map loaded from a local folder: its location is stored relative to the collection file's
folder, its page shows the file's true size and opens the deep-zoom viewer on the plugin's image
route, which serves the file re-encoded, by map id only, with the map page's permission checks."""

from __future__ import annotations

import io
import shutil
import sqlite3

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import draw_map, make_datasette, open_db


@pytest.fixture(scope="module")
def local_collection(tmp_path_factory, model_args):
    """``maps.db`` beside ``scans/``: a large JPEG, a PNG and a JPEG stored sideways (EXIF)."""
    from datasette_mapclip.cli import cli

    root = tmp_path_factory.mktemp("local")
    scans = root / "scans"
    scans.mkdir()
    draw_map(1, size=(2400, 1500)).save(scans / "big.jpg", "JPEG")
    draw_map(2, size=(900, 600)).save(scans / "plan.png", "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    draw_map(3, size=(800, 500)).save(scans / "turned.jpg", "JPEG", exif=exif)
    result = CliRunner().invoke(cli, ["load", "folder", str(root / "maps.db"), str(scans), *model_args,
                                      "--precision", "fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    conn = open_db(root / "maps.db")
    ids = {row[0]: row[1] for row in conn.execute("SELECT source_id, id FROM maps")}
    conn.close()
    return root, ids


def settings(**extra):
    return {"plugins": {"datasette-mapclip": {"index": "off", **extra}}}


def test_locations_are_stored_relative_to_the_collection_files_folder(local_collection):
    root, _ = local_collection
    conn = open_db(root / "maps.db")
    locations = sorted(row[0] for row in conn.execute("SELECT location FROM maps"))
    conn.close()
    assert locations == ["scans/big.jpg", "scans/plan.png", "scans/turned.jpg"]


@pytest.mark.asyncio
async def test_the_map_page_opens_the_viewer_on_the_local_image_with_its_true_size(local_collection):
    root, ids = local_collection
    ds = make_datasette([str(root / "maps.db")], metadata=settings())
    details = (await ds.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}.json")).json()
    assert details["deep_zoom"] is None
    assert details["local_image"] == {"url": f"/-/mapclip/image/maps/{ids['big.jpg']}.jpg",
                                      "width": 2400, "height": 1500}
    assert (details["map"]["width"], details["map"]["height"]) == (2400, 1500)
    turned = (await ds.client.get(f"/-/mapclip/map/maps/{ids['turned.jpg']}.json")).json()
    assert (turned["local_image"]["width"], turned["local_image"]["height"]) == (500, 800)
    page = await ds.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}")
    assert page.status_code == 200
    assert f'data-image-url="/-/mapclip/image/maps/{ids["big.jpg"]}.jpg"' in page.text
    assert "openseadragon.min.js" in page.text and "mapclip-map.js" in page.text
    assert "2400 &times; 1500 px" in page.text


@pytest.mark.asyncio
async def test_the_image_route_reencodes_within_the_long_side_setting(local_collection):
    root, ids = local_collection
    ds = make_datasette([str(root / "maps.db")], metadata=settings())
    response = await ds.client.get(f"/-/mapclip/image/maps/{ids['big.jpg']}.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "public, max-age=86400"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and image.size == (2400, 1500)  # under the default 4096
    png = Image.open(io.BytesIO((await ds.client.get(f"/-/mapclip/image/maps/{ids['plan.png']}.jpg")).content))
    assert png.format == "JPEG" and png.size == (900, 600)
    turned = Image.open(io.BytesIO((await ds.client.get(f"/-/mapclip/image/maps/{ids['turned.jpg']}.jpg")).content))
    assert turned.size == (500, 800)  # turned as its EXIF says
    capped = make_datasette([str(root / "maps.db")], metadata=settings(max_image_side=600))
    small = await capped.client.get(f"/-/mapclip/image/maps/{ids['big.jpg']}.jpg")
    assert Image.open(io.BytesIO(small.content)).size == (600, 375)
    # the page still gives the true size, not the served one
    assert (await capped.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}.json")).json()["local_image"]["width"] == 2400


@pytest.mark.asyncio
async def test_the_image_route_is_404_for_unknown_ids_unreadable_files_and_paths_leaving_the_folder(
        local_collection, tmp_path):
    root, ids = local_collection
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    conn = sqlite3.connect(copy / "maps.db")
    conn.execute("UPDATE maps SET location = '../outside.jpg' WHERE id = ?", (ids["plan.png"],))
    conn.execute("UPDATE maps SET location = ? WHERE id = ?", (str(copy / "maps.db"), ids["turned.jpg"]))
    conn.commit()
    conn.close()
    draw_map(9).save(tmp_path / "outside.jpg", "JPEG")
    (copy / "scans" / "big.jpg").write_bytes(b"not an image")
    ds = make_datasette([str(copy / "maps.db")], metadata=settings())
    for path in (f"/-/mapclip/image/maps/{ids['plan.png']}.jpg",    # ../ out of the folder
                 f"/-/mapclip/image/maps/{ids['turned.jpg']}.jpg",  # a file that is no picture
                 f"/-/mapclip/image/maps/{ids['big.jpg']}.jpg",     # a damaged picture
                 "/-/mapclip/image/maps/999999.jpg", "/-/mapclip/image/nope/1.jpg",
                 f"/-/mapclip/image/maps/{2**63}.jpg"):
        response = await ds.client.get(path)
        assert response.status_code == 404, (path, response.status_code)
    # the page then shows the thumbnail, without the viewer
    details = (await ds.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}.json")).json()
    assert details["local_image"] is None
    assert "data-image-url" not in (await ds.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}")).text


@pytest.mark.asyncio
async def test_the_image_route_checks_the_map_pages_permissions(local_collection):
    root, ids = local_collection
    private = make_datasette([str(root / "maps.db")], metadata={"databases": {"maps": {"allow": {"id": "librarian"}}},
                                                                **settings()})
    path = f"/-/mapclip/image/maps/{ids['big.jpg']}.jpg"
    assert (await private.client.get(path)).status_code == 403
    assert (await private.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}")).status_code == 403
    cookie = {"ds_actor": private.sign({"a": {"id": "librarian"}}, "actor")}
    allowed = await private.client.get(path, cookies=cookie)
    assert allowed.status_code == 200 and allowed.headers["cache-control"].startswith("private")


@pytest.mark.asyncio
async def test_old_files_with_absolute_locations_keep_working(local_collection, tmp_path):
    root, ids = local_collection
    copy = tmp_path / "maps.db"
    shutil.copy(root / "maps.db", copy)
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE maps SET location = ? || '/' || location", (str(root),))
    conn.execute("UPDATE maps SET width = 64, height = 64")  # recorded at a model's input size, as once
    conn.commit()
    conn.close()
    ds = make_datasette([str(copy)], metadata=settings())
    response = await ds.client.get(f"/-/mapclip/image/maps/{ids['plan.png']}.jpg")
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (900, 600)
    # the page shows the file's own size, not the recorded one
    page = await ds.client.get(f"/-/mapclip/map/maps/{ids['plan.png']}")
    assert "900 &times; 600 px" in page.text and "64 &times; 64" not in page.text


def test_stored_relative_locations_are_read_back_as_files(local_collection, tmp_path, monkeypatch):
    """Re-embedding and fine-tuning read the files from any working directory."""
    from datasette_mapclip.store import MapStore, read_maps_readonly

    root, _ = local_collection
    monkeypatch.chdir(tmp_path)
    for row in read_maps_readonly(root / "maps.db", ("id", "location")):
        assert (root / "scans").samefile(Image.open(row["location"]).filename.rsplit("/", 1)[0])
    store = MapStore(root / "maps.db")
    try:
        records, missing = store.stored_records()
    finally:
        store.close()
    assert missing == 0 and sorted(r.location for r in records) == sorted(
        str(root / "scans" / name) for name in ("big.jpg", "plan.png", "turned.jpg"))


@pytest.mark.asyncio
async def test_datasettes_row_and_table_pages_show_the_thumbnail_and_no_machine_path(local_collection, tmp_path):
    root, ids = local_collection
    plain = tmp_path / "plain.db"
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE maps (id INTEGER PRIMARY KEY, thumbnail BLOB)")
    conn.execute("INSERT INTO maps VALUES (1, x'ffd8ffe0')")
    conn.commit()
    conn.close()
    ds = make_datasette([str(root / "maps.db"), str(plain)], metadata=settings())
    map_id = ids["big.jpg"]
    row_page = await ds.client.get(f"/maps/maps/{map_id}")
    table_page = await ds.client.get("/maps/maps")
    for page in (row_page, table_page):
        assert page.status_code == 200
        assert f'<img src="/-/mapclip/thumbnail/maps/{map_id}.jpg" alt="Thumbnail of map {map_id}"' in page.text
        assert "&lt;Binary" not in page.text and "<Binary" not in page.text
        assert str(root) not in page.text and "scans/big.jpg" in page.text
    thumbnail = await ds.client.get(f"/-/mapclip/thumbnail/maps/{map_id}.jpg")
    assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"
    # another database's table of the same name keeps Datasette's own rendering
    other = await ds.client.get("/plain/maps/1")
    assert "Binary" in other.text and "/-/mapclip/thumbnail" not in other.text


@pytest.mark.asyncio
@pytest.mark.parametrize("location", ["a\x00b.jpg", "/dev/zero", "/", "scans", "x" * 5000, "/" + "x" * 5000,
                                      "scans/../scans/big.jpg", "", 42, b"scans/big.jpg", 1.5, None,
                                      "javascript:alert(1)", "https://example.org/x.jpg"])
async def test_odd_locations_another_tool_wrote_never_give_5xx(local_collection, tmp_path, location):
    root, ids = local_collection
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    conn = sqlite3.connect(copy / "maps.db")
    conn.execute("UPDATE maps SET location = ? WHERE id = ?", (location, ids["big.jpg"]))
    conn.commit()
    conn.close()
    ds = make_datasette([str(copy / "maps.db")], metadata=settings())
    image = await ds.client.get(f"/-/mapclip/image/maps/{ids['big.jpg']}.jpg")
    assert image.status_code == 404, image.text
    page = await ds.client.get(f"/-/mapclip/map/maps/{ids['big.jpg']}")
    assert page.status_code == 200 and "data-image-url" not in page.text
