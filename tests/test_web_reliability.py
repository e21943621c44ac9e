"""The plugin's pages against what a request or another tool can put in front of them: ids in any
script or of any length, rows whose columns hold the wrong type, and collections whose names need
quoting in a URL.  Through the real app on a real collection."""

from __future__ import annotations

import re
import shutil
import sqlite3
import urllib.parse

import pytest

from conftest import load_collection, make_datasette

PLUGIN = {"plugins": {"datasette-mapclip": {"index": "off"}}}
SEARCH_ROUTES = ("/-/mapclip/search.json", "/-/mapclip", "/-/mapclip/export.csv", "/-/mapclip/export.json")
MAP_FORMATS = ("", ".json", ".bib", ".csl.json", ".txt")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 6)
    return db_path


@pytest.fixture
def ds(collection):
    return make_datasette([str(collection)], metadata=PLUGIN)


# -- ids --------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("query", [
    "like=1&more=²", "like=1&fewer=²", "like=1&more=2,²", "term=map:²", "term=map:" + "1" * 5000,
"like=١", "like=1&more=٣", "term=map:١", "like=1&k=٣",
])
async def test_ids_that_are_not_ascii_digits_or_too_long_are_400_everywhere(ds, query):
    for route in SEARCH_ROUTES:
        response = await ds.client.get(f"{route}?{query}")
        assert response.status_code == 400, (route, query[:40], response.status_code, response.text[:300])
        if route.endswith(".json"):
            assert response.json()["ok"] is False and response.json()["error"]


@pytest.mark.asyncio
async def test_an_id_of_5000_digits_in_a_path_is_404_and_ids_in_range_still_parse(ds):
    digits = "1" * 5000
    paths = [f"/-/mapclip/thumbnail/maps/{digits}.jpg"] + [f"/-/mapclip/map/maps/{digits}{f}" for f in MAP_FORMATS]
    for path in paths:
        response = await ds.client.get(path)
        assert response.status_code == 404, (path[-20:], response.status_code, response.text[:300])
    assert (await ds.client.get("/-/mapclip/search.json?like=001&more=0002")).status_code == 200
    largest = await ds.client.get(f"/-/mapclip/search.json?like=1&more={2**63 - 1}")
    assert largest.status_code == 404 and "has no vector" in largest.json()["error"]  # in range, not stored
    assert (await ds.client.get(f"/-/mapclip/search.json?like=1&more={2**63}")).status_code == 400
    assert (await ds.client.get("/-/mapclip/map/maps/0001.json")).json()["map"]["id"] == 1


# -- rows another tool wrote ------------------------------------------------------------------

# Text columns have TEXT affinity: SQLite stores a number written there as text, so only a BLOB
# is the wrong type for them; INTEGER columns keep text that is not a number, and fractions.
WRONG_TYPES = [
    ("year", "'abc'"), ("year", "x'31383530ff'"), ("year", "18.5"),
    ("sheet", "'two'"), ("sheet", "x'02'"),
    ("title", "x'4d6170ff2041'"), ("date", "x'ff'"), ("place", "x'ff'"), ("item_id", "x'ff'"),
    ("subjects", "x'ff'"), ("notes", "x'ff'"), ("format", "x'ff'"), ("width", "'wide'"), ("height", "x'ff'"),
]


def edited_copy(collection, folder, column, value):
    copy = folder / "maps.db"
    shutil.copy(collection, copy)
    conn = sqlite3.connect(copy)
    conn.execute(f"UPDATE maps SET {column} = {value} WHERE id = 1")
    assert conn.execute(f"SELECT typeof({column}) FROM maps WHERE id = 1").fetchone()[0] != "null"
    conn.commit()
    conn.close()
    return copy


def no_bytes_shown(text):
    """No ``b'...'`` (a bytes value's repr) on a page or in a file, HTML-escaped or not."""
    shown = re.search(r"(?<![\w\\])b(&#39;|&#x27;|'|\\\"|&#34;|&quot;)|\\x[0-9a-f]{2}", text)
    assert not shown, text[max(0, shown.start() - 200):shown.end() + 200]


@pytest.mark.asyncio
@pytest.mark.parametrize("column,value", WRONG_TYPES)
async def test_a_column_of_the_wrong_type_is_shown_typed_on_every_page(collection, tmp_path, column, value):
    ds = make_datasette([str(edited_copy(collection, tmp_path, column, value))], metadata=PLUGIN)
    for suffix in MAP_FORMATS:
        response = await ds.client.get(f"/-/mapclip/map/maps/1{suffix}")
        assert response.status_code == 200, (suffix, response.text[:500])
        no_bytes_shown(response.text)
    record = (await ds.client.get("/-/mapclip/map/maps/1.json")).json()["map"]
    for name in ("year", "sheet", "width", "height"):
        assert record[name] is None or type(record[name]) is int, (name, record[name])
    for name in ("title", "date", "place", "notes", "format", "item_id", "url", "image_url"):
        assert record[name] is None or isinstance(record[name], str), (name, record[name])
    for route in SEARCH_ROUTES:  # the row is its own nearest map: every search below shows it
        response = await ds.client.get(f"{route}?like=1&k=6")
        assert response.status_code == 200, (route, response.text[:500])
        no_bytes_shown(response.text)
    result = [r for r in (await ds.client.get("/-/mapclip/search.json?like=1")).json()["results"] if r["id"] == 1][0]
    assert result["year"] is None or type(result["year"]) is int
    assert result["sheet"] is None or type(result["sheet"]) is int
    assert all(result[name] is None or isinstance(result[name], str) for name in ("title", "date", "place", "item_id"))


@pytest.mark.asyncio
@pytest.mark.parametrize("column,value,field,shown", [
    ("title", "x'4d6170ff2041'", "title", "Map\ufffd A"),
    ("item_url", "x'68747470733a2f2f6c6f632e676f762f6974656d2f31'", "url", "https://loc.gov/item/1"),
])
async def test_a_blob_is_decoded_as_utf8_with_replacement(collection, tmp_path, column, value, field, shown):
    ds = make_datasette([str(edited_copy(collection, tmp_path, column, value))], metadata=PLUGIN)
    assert (await ds.client.get("/-/mapclip/map/maps/1.json")).json()["map"][field] == shown
    result = (await ds.client.get("/-/mapclip/search.json?like=1")).json()["results"][0]
    assert result["id"] == 1 and result[field] == shown


# -- collections whose names need quoting -----------------------------------------------------

NAMES = ["карты", 'old "town" maps']


def internal_links(html):
    return [u.replace("&amp;", "&") for u in re.findall(r'(?:href|src)="(/[^"]*)"', html)]


@pytest.mark.asyncio
@pytest.mark.parametrize("name", NAMES)
async def test_every_link_the_plugin_emits_for_a_quoted_name_resolves(collection, tmp_path, name):
    path = tmp_path / f"{name}.db"
    shutil.copy(collection, path)
    ds = make_datasette([str(path)], metadata=PLUGIN)
    assert name in ds.databases
    db = urllib.parse.quote(name)
    data = (await ds.client.get(f"/-/mapclip/search.json?like=1&k=2&_db={db}")).json()
    assert data["ok"] and data["database"] == name
    links = [r[key] for r in data["results"] for key in ("map_url", "thumbnail_url", "record_url")]
    links += [data["next"], data["sql_url"]]
    page = await ds.client.get(f"/-/mapclip?like=1&k=2&_db={db}")
    assert page.status_code == 200
    links += internal_links(page.text)
    map_page = await ds.client.get(data["results"][0]["map_url"])
    assert map_page.status_code == 200, map_page.text[:300]
    links += internal_links(map_page.text)
    links += [r[key] for r in (await ds.client.get(data["results"][0]["map_url"] + ".json")).json()["sheets"]
              for key in ("map_url", "thumbnail_url")]
    assert any("/-/mapclip/thumbnail/" in link for link in links) and any("/-/mapclip/map/" in link for link in links)
    for link in dict.fromkeys(links):
        if link.startswith("/-/logout"):
            continue
        response = await ds.client.get(link, follow_redirects=True)
        assert response.status_code == 200, (link, response.status_code)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", NAMES)
async def test_the_downloads_name_the_collection_in_a_well_formed_header(collection, tmp_path, name):
    path = tmp_path / f"{name}.db"
    shutil.copy(collection, path)
    ds = make_datasette([str(path)], metadata=PLUGIN)
    for extension in ("csv", "json"):
        response = await ds.client.get(f"/-/mapclip/export.{extension}?like=1&_db={urllib.parse.quote(name)}")
        assert response.status_code == 200
        header = response.headers["content-disposition"]
        assert header.isascii() and "\r" not in header and "\n" not in header
        match = re.fullmatch(r"""attachment; filename="([A-Za-z0-9._-]+)"; filename\*=UTF-8''([A-Za-z0-9%._~-]+)""",
                             header)
        assert match, header
        assert match.group(1).endswith(f".{extension}")
        assert urllib.parse.unquote(match.group(2)) == f"mapclip-{name}-results.{extension}"
    found = (await ds.client.get(f"/-/mapclip/search.json?like=1&_db={urllib.parse.quote(name)}")).json()
    bib = await ds.client.get(found["results"][0]["map_url"] + ".bib")
    assert bib.status_code == 200
    assert re.fullmatch(r'attachment; filename="[A-Za-z0-9._-]+\.bib"; filename\*=.+', bib.headers["content-disposition"])
