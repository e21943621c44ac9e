"""Hostile catalogue values and requests: only http(s) links, capped text, clear 4xx, never a 5xx."""

from __future__ import annotations

import shutil
import urllib.parse

import pytest

from conftest import load_collection, make_datasette, query_json_path
from datasette_mapclip.store import MapStore

HOSTILE_URLS = ["javascript:alert(1)", " JavaScript:alert(1)", "data:text/html,<script>alert(1)</script>",
                "vbscript:msgbox(1)", "//evil.example/x", "/etc/passwd", "http:/no-host"]


@pytest.fixture(scope="module")
def hostile_db(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 8)
    copy = tmp_path_factory.mktemp("hostile") / "maps.db"
    shutil.copy(db_path, copy)
    store = MapStore(copy)
    with store.transaction():
        for map_id, url in enumerate(HOSTILE_URLS, start=1):
            store.conn.execute(
                "UPDATE maps SET item_url = ?, image_url = ?, thumbnail_url = ?, thumbnail = NULL, "
                "title = ? WHERE id = ?",
                (url, url, url, '<script>alert("t")</script><img src=x onerror=alert(1)>', map_id))
        store.conn.execute("UPDATE maps SET item_url = 'https://www.loc.gov/item/ok/' WHERE id = 8")
    store.close()
    return copy


@pytest.mark.asyncio
async def test_only_http_urls_become_links(hostile_db):
    ds = make_datasette([str(hostile_db)])
    data = (await ds.client.get("/-/mapclip/search.json?like=8&k=8")).json()
    assert len(data["results"]) == 8
    for result in data["results"]:
        for key in ("url", "image_url", "thumbnail_url"):
            value = result[key]
            assert value is None or value.startswith(("https://", "http://", "/")), (key, value)
            assert value is None or not value.startswith("//")
            assert "javascript" not in (value or "").lower() and "data:" not in (value or "")
    by_id = {r["id"]: r for r in data["results"]}
    assert by_id[8]["url"] == "https://www.loc.gov/item/ok/"
    assert by_id[1]["url"] == by_id[1]["record_url"]  # the unsafe catalogue link falls back to the record
    html = (await ds.client.get("/-/mapclip?like=1&k=8")).text
    assert "javascript:" not in html.lower() and "data:text/html" not in html and "vbscript:" not in html
    assert '<script>alert("t")' not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;" in html  # shown as text


@pytest.mark.asyncio
@pytest.mark.parametrize("query,status,message", [
    ("q=" + "a" * 1001, 400, "q is too long: 1001 characters, limit 1000"),
    ("filter=" + "a" * 1001 + "&like=1", 400, "filter is too long"),
    ("like=99999999999999999999", 400, "like must be between"),
    ("like=-1", 400, "like must be between"),
    ("like=" + "9" * 5000, 400, "like must be a whole number"),
    ("like=1&year_min=10000000000000000000000", 400, "year_min must be"),
])
async def test_oversized_and_out_of_range_parameters_get_400(hostile_db, query, status, message):
    ds = make_datasette([str(hostile_db)])
    response = await ds.client.get(f"/-/mapclip/search.json?{query}")
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.asyncio
@pytest.mark.parametrize("path,status", [
    ("/-/mapclip/thumbnail/maps/99999999999999999999999.jpg", 404),
    ("/-/mapclip/thumbnail/_internal/1.jpg", 404),
    ("/-/mapclip/thumbnail/nope/1.jpg", 404),
])
async def test_thumbnail_route_answers_bad_paths_with_404(hostile_db, path, status):
    ds = make_datasette([str(hostile_db)])
    assert (await ds.client.get(path)).status_code == status


def sql_error(ds, sql):
    return ds.client.get(query_json_path("maps") + "?" + urllib.parse.urlencode({"sql": sql, "_shape": "array"}))


@pytest.mark.asyncio
@pytest.mark.parametrize("sql,message", [
    ("select mapclip_embed_text(:t)".replace(":t", "'" + "a" * 1001 + "'"), "text is 1001 characters, limit 1000"),
    ("select mapclip_combine(x'0000c07f', 1)", "contains NaN or infinite values"),
    ("select mapclip_combine(x'0000803f', 1, x'0000807f', 1)", "contains NaN or infinite values"),
    ("select mapclip_similarity(x'0000c07f', x'0000803f')", "contains NaN or infinite values"),
    ("select mapclip_combine(x'0000803f', 'nan')", "expected a finite number"),
    ("select mapclip_combine(x'0000803f', 1e999)", "expected a finite number"),
    ("select mapclip_embed_text('a', 'b', 'c')", "mapclip_embed_text takes (text [, model]); got 3 arguments"),
    ("select mapclip_embed_image()", "mapclip_embed_image takes (image [, model]); got 0 arguments"),
])
async def test_sql_functions_refuse_bad_values_with_sql_errors(hostile_db, sql, message):
    ds = make_datasette([str(hostile_db)])
    response = await sql_error(ds, sql)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
