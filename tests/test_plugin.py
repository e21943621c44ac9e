"""The Datasette plugin through Datasette's own test client, on a real mapclip database."""

import io
import re
import urllib.parse

import numpy as np
import pytest

from conftest import (
    DATASETTE_1,
    SAME_ORIGIN,
    csrf_cookies,
    cut_permission_checks,
    draw_map,
    load_collection,
    make_datasette,
    open_db,
)
from datasette_mapclip.store import MapStore, vectors


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 30)


SEARCH_PATHS = {"sqlite-vec": "sqlite-vec", "in-memory": "in-memory exact"}


@pytest.fixture(params=list(SEARCH_PATHS))
async def ds(collection, request):
    """The collection served twice over: searches through sqlite-vec (index off), and through the
    in-memory index (waited for).  Each search test runs on both paths, never on whichever wins a race."""
    if request.param == "sqlite-vec":
        served = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    else:
        served = make_datasette([str(collection[0])])
        await wait_for_index(served)
    served.search_path = SEARCH_PATHS[request.param]
    return served


@pytest.fixture(scope="module")
def stored(collection):
    store = MapStore(collection[0])
    ids, matrix = store.vectors()
    years = dict(store.conn.execute("SELECT id, year FROM maps").fetchall())
    return ids, matrix, years


def sql_json(ds, sql, **params):
    return ds.client.get("/maps.json?" + urllib.parse.urlencode({"sql": sql, "_shape": "array", **params}),
                         follow_redirects=True)  # Datasette 1.0 moved queries to /db/-/query


def changed_copy(collection, path, sql: str):
    """A copy of the test collection with ``sql`` run on it (a broken or moved deployment)."""
    import shutil

    shutil.copy(collection[0], path)
    store = MapStore(path)
    store.conn.executescript(sql)
    store.close()
    return path


def expected_order(matrix, ids, query, k):
    scores = matrix @ query
    order = np.argsort(-scores)[:k]
    return [int(ids[i]) for i in order], scores[order]


@pytest.mark.asyncio
async def test_sql_functions_feed_vec0_directly(ds, stored, tiny_encoder):
    ids, matrix, _ = stored
    response = await sql_json(ds, "select hex(mapclip_embed_text(:q)) as v", q="a nautical chart")
    assert response.status_code == 200
    vector = vectors.decode(bytes.fromhex(response.json()[0]["v"]))
    np.testing.assert_allclose(vector, tiny_encoder.encode_texts(["a nautical chart"])[0], atol=1e-5)
    table = MapStore(ds.databases["maps"].path).model()["vector_table"]
    response = await sql_json(
        ds, f"select map_id, 1 - distance*distance/2 as s from {table} where embedding match mapclip_embed_text(:q) and k = :k",
        q="relief", k="5")
    got = [row["map_id"] for row in response.json()]
    want, _ = expected_order(matrix, ids, tiny_encoder.encode_texts(["relief"])[0], 5)
    assert got == want


@pytest.mark.asyncio
async def test_combine_and_similarity(ds):
    a, b = vectors.encode([1, 0, 0, 0]), vectors.encode([0, 1, 0, 0])
    response = await sql_json(ds, "select hex(mapclip_combine(unhex(:a), 1, unhex(:b), 1)) as v, "
                                  "mapclip_similarity(unhex(:a), unhex(:b)) as s, "
                                  "hex(mapclip_combine(unhex(:a), 1, unhex(:b), -0.5)) as minus",
                              a=a.hex(), b=b.hex())
    row = response.json()[0]
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["v"])), [2 ** -0.5, 2 ** -0.5, 0, 0], atol=1e-6)
    assert row["s"] == 0
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["minus"])), np.array([1, -0.5, 0, 0]) / np.sqrt(1.25), atol=1e-6)


@pytest.mark.asyncio
async def test_combine_and_similarity_normalise_vectors_that_are_not_unit_length(ds):
    # Each term counts by its weight, not its length: [3,0,0,0] and [0,0.5,0,0] weigh the same.
    a, b = vectors.encode([3, 0, 0, 0]), vectors.encode([0, 0.5, 0, 0])
    c, d = vectors.encode([3, 4, 0, 0]), vectors.encode([6, 0, 0, 0])
    row = (await sql_json(ds, "select hex(mapclip_combine(unhex(:a), 1, unhex(:b), 1)) as v, "
                              "hex(mapclip_combine(unhex(:c), 2)) as single, "
                              "mapclip_similarity(unhex(:c), unhex(:d)) as s",
                          a=a.hex(), b=b.hex(), c=c.hex(), d=d.hex())).json()[0]
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["v"])), [2 ** -0.5, 2 ** -0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["single"])), [0.6, 0.8, 0, 0], atol=1e-6)
    assert row["s"] == pytest.approx(0.6, abs=1e-6)  # cosine, not the dot product (18)


@pytest.mark.asyncio
async def test_prompt_template_wraps_every_text_query(collection, stored, tiny_encoder):
    ids, matrix, _ = stored
    ds = make_datasette([str(collection[0])],
                   metadata={"plugins": {"datasette-mapclip": {"prompt_template": "an old {} map", "index": "off"}}})
    templated = tiny_encoder.encode_texts(["an old relief map"])[0]
    assert not np.allclose(templated, tiny_encoder.encode_texts(["relief"])[0], atol=1e-3)
    row = (await sql_json(ds, "select hex(mapclip_embed_text('relief')) as v")).json()[0]
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["v"])), templated, atol=1e-5)
    data = (await ds.client.get("/-/mapclip/search.json?q=relief&k=6")).json()
    want, scores = expected_order(matrix, ids, templated, 6)
    assert [r["id"] for r in data["results"]] == want
    np.testing.assert_allclose([r["similarity"] for r in data["results"]], scores, atol=1e-3)


@pytest.mark.asyncio
async def test_thumbnail_route_serves_that_maps_own_picture(ds, collection):
    from PIL import Image

    conn = MapStore(collection[0]).conn
    stored = dict(conn.execute("SELECT id, thumbnail FROM maps WHERE thumbnail IS NOT NULL").fetchall())
    files = dict(conn.execute("SELECT id, location FROM maps").fetchall())
    assert len(stored) >= 3
    for map_id in list(stored)[:3]:
        response = await ds.client.get(f"/-/mapclip/thumbnail/maps/{map_id}.jpg")
        assert response.status_code == 200 and response.content == stored[map_id]
        # ... and that blob is the picture of this map's own file, not a neighbour's
        served = np.asarray(Image.open(io.BytesIO(response.content)).convert("L").resize((32, 24)), np.float32)
        sources = {other: np.asarray(Image.open(collection[1] / files[other]).convert("L").resize((32, 24)), np.float32)
                   for other in list(stored)[:6]}
        closest = min(sources, key=lambda other: np.abs(sources[other] - served).mean())
        assert closest == map_id


@pytest.mark.asyncio
@pytest.mark.parametrize("sql,message", [
    ("select mapclip_embed_text(NULL)", "mapclip_embed_text: text is NULL"),
    ("select mapclip_embed_image(x'3c68746d6c3e')", "mapclip_embed_image: not an image"),
    ("select mapclip_embed_image('a string')", "takes image bytes (a BLOB), not text"),
    ("select mapclip_similarity(x'0000803f', x'0000803f00000000')", "has 2 floats, expected 1"),
    ("select mapclip_combine(x'0000803f', 1, x'0000803f00000000', 1)", "vectors differ in length"),
    ("select mapclip_combine(x'0000803f', 1, x'0000803f')", "takes pairs"),
    ("select mapclip_combine(x'000080', 1)", "not a float32 vector"),
])
async def test_bad_arguments_raise_errors_that_say_what_was_wrong(ds, sql, message):
    response = await sql_json(ds, sql)
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.asyncio
async def test_search_json_text(ds, stored, tiny_encoder):
    ids, matrix, _ = stored
    response = await ds.client.get("/-/mapclip/search.json?q=nautical+chart&k=5")
    assert response.status_code == 200
    data = response.json()
    assert data["searched_with"] == ds.search_path
    want, scores = expected_order(matrix, ids, tiny_encoder.encode_texts(["nautical chart"])[0], 5)
    assert [r["id"] for r in data["results"]] == want
    np.testing.assert_allclose([r["similarity"] for r in data["results"]], scores, atol=1e-3)
    first = data["results"][0]
    assert set(first) >= {"id", "title", "date", "year", "place", "similarity", "thumbnail_url", "image_url", "url"}
    assert first["thumbnail_url"] == f"/-/mapclip/thumbnail/maps/{first['id']}.jpg"
    assert data["model"].startswith("mapclip-tiny/sha256:")
    assert "mapclip_embed_text(:q)" in data["sql"]
    thumb = await ds.client.get(first["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.asyncio
async def test_the_sql_link_reproduces_the_results(ds):
    data = (await ds.client.get("/-/mapclip/search.json?q=roads&k=4&year_min=1805")).json()
    link = urllib.parse.urlsplit(data["sql_url"])
    assert link.path == ("/maps/-/query" if DATASETTE_1 else "/maps")  # where each line runs SQL
    rows = (await ds.client.get(link.path + ".json?" + link.query + "&_shape=array")).json()
    assert [r["id"] for r in rows] == [r["id"] for r in data["results"]]


@pytest.mark.asyncio
async def test_more_like_this_uses_the_stored_vector(ds, stored):
    ids, matrix, _ = stored
    target = int(ids[7])
    data = (await ds.client.get(f"/-/mapclip/search.json?like={target}&k=6")).json()
    want, _ = expected_order(matrix, ids, matrix[7], 6)
    assert [r["id"] for r in data["results"]] == want
    assert data["results"][0]["id"] == target and data["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert "mapclip_embed" not in data["sql"]  # no model run


@pytest.mark.asyncio
@pytest.mark.parametrize("weight", [-1.0, -0.4, 0.0, 0.6, 1.0])
async def test_combined_search_follows_the_seed_weight_convention(ds, stored, tiny_encoder, weight):
    ids, matrix, _ = stored
    text = tiny_encoder.encode_texts(["hand coloured county map"])[0]
    image = matrix[3]
    query = (1 + weight) / 4 * text + (1 - weight) / 4 * image
    want, scores = expected_order(matrix, ids, query / np.linalg.norm(query), 8)
    data = (await ds.client.get(
        f"/-/mapclip/search.json?q=hand+coloured+county+map&like={int(ids[3])}&weight={weight}&k=8")).json()
    assert [r["id"] for r in data["results"]] == want
    np.testing.assert_allclose([r["similarity"] for r in data["results"]], scores, atol=1e-3)


@pytest.mark.asyncio
async def test_filters_narrow_the_knn_itself_not_just_the_top_k(ds, stored, tiny_encoder):
    ids, matrix, years = stored
    text = tiny_encoder.encode_texts(["survey"])[0]
    allowed = np.array([1820 <= years[int(i)] <= 1825 for i in ids])
    want, _ = expected_order(matrix[allowed], ids[allowed], text, 20)
    data = (await ds.client.get("/-/mapclip/search.json?q=survey&year_min=1820&year_max=1825&k=20")).json()
    assert [r["id"] for r in data["results"]] == want and len(want) == 6
    data = (await ds.client.get("/-/mapclip/search.json?q=survey&filter=number+12&k=20")).json()
    assert [r["title"] for r in data["results"]] == ["Map number 12 of Vermont"]
    data = (await ds.client.get("/-/mapclip/search.json?q=survey&place=vermont&k=3")).json()
    assert len(data["results"]) == 3
    data = (await ds.client.get("/-/mapclip/search.json?q=survey&place=ohio&k=3")).json()
    assert data["results"] == [] and data["next"] is None


@pytest.mark.asyncio
async def test_paging_continues_the_ranking(ds):
    both = (await ds.client.get("/-/mapclip/search.json?q=atlas&k=10")).json()["results"]
    first = (await ds.client.get("/-/mapclip/search.json?q=atlas&k=5")).json()
    second = (await ds.client.get(first["next"])).json()
    assert [r["id"] for r in first["results"] + second["results"]] == [r["id"] for r in both]


def multipart(fields: dict, image: bytes | None, filename="map.jpg"):
    boundary = "----mapclipboundary"
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if image is not None:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                   f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def jpeg(image):
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.mark.asyncio
async def test_upload_searches_by_any_image_and_redirects_to_a_shareable_url(ds, stored, tiny_encoder, collection):
    ids, matrix, _ = stored
    page = await ds.client.get("/-/mapclip")
    token = re.search(r'name="csrftoken" value="([^"]+)"', page.text).group(1)
    picture = draw_map(1234)  # not in the collection
    body, content_type = multipart({"csrftoken": token, "q": "", "weight": "0"}, jpeg(picture))
    response = await ds.client.post("/-/mapclip", content=body, headers={"content-type": content_type, **SAME_ORIGIN},
                                    cookies=csrf_cookies(page))
    assert response.status_code == 302
    location = response.headers["location"]
    assert "vector=" in location
    data = (await ds.client.get(location.replace("/-/mapclip?", "/-/mapclip/search.json?"))).json()
    from datasette_mapclip.model.images import open_query_image

    query = tiny_encoder.encode_images([open_query_image(jpeg(picture), min_size=tiny_encoder.image_size)])[0]
    want, _ = expected_order(matrix, ids, query, 20)
    assert [r["id"] for r in data["results"]] == want
    shared = await ds.client.get(location)
    assert shared.status_code == 200 and "using your uploaded image" in shared.text


@pytest.mark.asyncio
async def test_upload_without_csrf_token_is_refused(ds):
    page = await ds.client.get("/-/mapclip")
    body, content_type = multipart({"q": "x"}, jpeg(draw_map(1)))
    # 0.65: a form without its token; 1.0: a form posted from another site (header-based CSRF)
    headers = {"content-type": content_type, **({"sec-fetch-site": "cross-site"} if DATASETTE_1 else {})}
    response = await ds.client.post("/-/mapclip", content=body, headers=headers, cookies=csrf_cookies(page))
    assert response.status_code == 403


@pytest.mark.asyncio
@pytest.mark.parametrize("payload,status,message", [
    (b"<!DOCTYPE html><html>hi</html>", 400, "not a usable image: not an image: the server sent an HTML page"),
    (b"", 400, "the uploaded file is empty"),
    (b"\xff" * (11 * 1024 * 1024), 413, "upload too large"),
])
async def test_bad_uploads_get_4xx_that_say_why(ds, payload, status, message):
    body, content_type = multipart({"q": ""}, payload)
    response = await ds.client.post("/-/mapclip/search.json", content=body, headers={"content-type": content_type})
    assert response.status_code == status
    assert message in response.json()["error"]


@pytest.mark.asyncio
async def test_decompression_bomb_upload_is_refused(ds):
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (20000, 12000)).save(out, "PNG")
    body, content_type = multipart({}, out.getvalue(), "bomb.png")
    response = await ds.client.post("/-/mapclip/search.json", content=body, headers={"content-type": content_type})
    assert response.status_code == 400 and "too many pixels" in response.json()["error"]


@pytest.mark.asyncio
async def test_upload_pixel_cap_applies_below_pillows_own_guard(collection):
    from PIL import Image

    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"max_upload_pixels": 40_000}}})
    small, large = jpeg(draw_map(5, (190, 190))), jpeg(draw_map(5, (260, 200)))  # 36,100 and 52,000 pixels
    assert 52_000 < Image.MAX_IMAGE_PIXELS  # far below Pillow's own guard: only the plugin's cap can refuse it
    for picture, status in ((small, 200), (large, 400)):
        body, content_type = multipart({}, picture)
        response = await ds.client.post("/-/mapclip/search.json", content=body, headers={"content-type": content_type})
        assert response.status_code == status, response.text
    assert "too many pixels: 260x200" in response.json()["error"] and "limit" in response.json()["error"]


@pytest.mark.asyncio
@pytest.mark.parametrize("query,message", [
    ("", "give q (text), like (a map id), vector, or POST an image"),
    ("q=x&weight=2", "weight must be between -1 (image only) and 1 (text only)"),
    ("q=x&k=abc", "k must be a whole number"),
    ("q=x&_db=nope", "no mapclip collection named 'nope'"),
    ("vector=0000803f", "vector has 1 floats; model"),
    ("q=x&model=other", "no model 'other'"),
])
async def test_bad_parameters_get_400_that_say_why(ds, query, message):
    response = await ds.client.get(f"/-/mapclip/search.json?{query}")
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.asyncio
async def test_page_renders_a_grid_with_links(ds):
    response = await ds.client.get("/-/mapclip?q=relief+map&k=4")
    assert response.status_code == 200
    html = response.text
    assert html.count('class="mapclip-card"') == 4
    assert "New search like this map" in html and "View and edit the SQL" in html
    # provenance lives on "About this search" (tests/test_about.py), not as command lines on the public page
    assert '<a href="/-/mapclip/about?_db=maps" class="mapclip-about-link">About this search</a>' in html
    assert "--pretrained" not in html
    assert re.search(r'<img src="/-/mapclip/thumbnail/maps/\d+\.jpg"', html)
    index = await ds.client.get("/")
    assert "/-/mapclip" in index.text  # in Datasette's menu
    database_page = await ds.client.get("/maps")
    assert "/-/mapclip?_db=maps" in database_page.text


@pytest.mark.asyncio
async def test_database_whose_model_cannot_be_loaded_still_opens(collection, tmp_path, monkeypatch):
    # a server elsewhere: the database names a path, this machine never saw the weights
    # (a file without query encoders, so a text search needs the weights)
    copy = changed_copy(collection, tmp_path / "moved.db", "UPDATE models SET checkpoint_path = '/nowhere/tiny.pt'; "
                        "DELETE FROM query_encoders; DELETE FROM encoder_files;")
    monkeypatch.setenv("MAPCLIP_CHECKPOINT_REGISTRY", str(tmp_path / "empty-registry"))
    ds = make_datasette([str(copy)])
    assert (await ds.client.get("/moved/maps.json?_shape=array&_size=1")).status_code == 200
    response = await ds.client.get("/-/mapclip/search.json?q=relief")
    assert response.status_code == 503
    assert "were not found on this server" in response.json()["error"]
    assert "a file named tiny.pt" in response.json()["error"]
    assert "/nowhere" not in response.json()["error"]  # a path in the database is never opened
    like = await ds.client.get("/-/mapclip/search.json?like=1&k=3")
    assert like.status_code == 200 and len(like.json()["results"]) == 3  # stored vectors need no model


@pytest.mark.asyncio
async def test_plugin_config_points_at_the_weights_elsewhere_checked_by_hash(collection, tmp_path, tiny_checkpoint,
                                                                              monkeypatch):
    import shutil

    monkeypatch.setenv("MAPCLIP_CHECKPOINT_REGISTRY", "off")  # a server that never loaded these weights

    copy = tmp_path / "moved.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    name = store.model()["name"]
    store.conn.execute("UPDATE models SET checkpoint_path = '/nowhere/tiny.pt'")
    store.remove_query_encoders(name)  # a file without query encoders: it needs the weights
    store.close()
    moved_weights = tmp_path / "weights.pt"
    shutil.copy(tiny_checkpoint, moved_weights)
    wrong_weights = tmp_path / "wrong.pt"
    wrong_weights.write_bytes(b"not the same weights")
    ds = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {"checkpoints": {name: str(wrong_weights)}}}})
    response = await ds.client.get("/-/mapclip/search.json?q=relief")
    assert response.status_code == 503 and "SHA-256 does not match" in response.json()["error"]
    ds = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {"checkpoints": {name: str(moved_weights)}}}})
    response = await ds.client.get("/-/mapclip/search.json?q=relief")
    assert response.status_code == 200 and len(response.json()["results"]) == 20


@pytest.mark.asyncio
async def test_published_metadata_yml_canned_queries_and_hidden_tables(tmp_path):
    """metadata.yml as shipped, on a ViT-B-32/openai database like the paper's (via import-beto)."""
    import torch
    import yaml
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    urls = [f"https://tile.loc.gov/image-services/iiif/service:gmd:test:{n}/full/pct:100/0/default.jpg" for n in range(6)]
    torch.save(torch.nn.functional.normalize(torch.randn(6, 512), dim=-1), tmp_path / "beto.pt")
    torch.save(urls, tmp_path / "beto_idx.pt")
    db_path = tmp_path / "maps.db"
    result = CliRunner().invoke(cli, ["import-beto", str(db_path), str(tmp_path / "beto.pt"), str(tmp_path / "beto_idx.pt"), "--quiet"])
    assert result.exit_code == 0, result.output
    metadata = yaml.safe_load(open(__import__("pathlib").Path(__file__).parent.parent / "metadata.yml"))
    ds = make_datasette([str(db_path)], metadata=metadata)
    rows = (await ds.client.get("/maps/similar_to_map.json?map_id=3&_shape=array")).json()
    assert rows[0]["id"] == 3 and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5) and len(rows) == 6
    tables = (await ds.client.get("/maps.json")).json()["tables"]
    hidden = {t["name"] for t in tables if t["hidden"]}
    assert "map_vectors_vit_b_32_openai" in hidden and "map_vectors_vit_b_32_openai_chunks" in hidden
    assert "maps" not in hidden
    # without the plugin-level hiding from metadata.yml, the hook hides them too
    plain = make_datasette([str(db_path)])
    tables = (await plain.client.get("/maps.json")).json()["tables"]
    assert {t["name"] for t in tables if t["hidden"]} >= {"map_vectors_vit_b_32_openai", "map_vectors_vit_b_32_openai_rowids"}


async def wait_for_index(ds, database="maps"):
    import asyncio

    from datasette_mapclip.web.state import collections_of

    collection = await collections_of(ds).open(None, database)
    for _ in range(200):
        found = collection.index()
        if found is not None and not found.provisional:  # (a restart's exact scans of the cache come first)
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("index never became ready")


@pytest.mark.asyncio
@pytest.mark.parametrize("config", [{}, {"int8_min_rows": 10}])
async def test_in_memory_index_answers_like_sqlite_vec(collection, config):
    """The fast path (exact numpy, or the int8 scan with exact re-scoring) returns what the SQL returns."""
    plain = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    fast = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": config}})
    found = await wait_for_index(fast)
    assert found.exact == (not config)
    for query in ("q=relief+map&k=7", "like=5&k=7", "q=chart&like=9&weight=0.3&k=5&page=2"):
        slow = (await plain.client.get(f"/-/mapclip/search.json?{query}")).json()
        quick = (await fast.client.get(f"/-/mapclip/search.json?{query}")).json()
        assert slow["searched_with"] == "sqlite-vec" and quick["searched_with"].startswith("in-memory")
        assert [r["id"] for r in quick["results"]] == [r["id"] for r in slow["results"]]
        np.testing.assert_allclose([r["similarity"] for r in quick["results"]],
                                   [r["similarity"] for r in slow["results"]], atol=1e-3)
        assert quick["sql"] == slow["sql"]


FILTERED_QUERIES = [
    "q=relief&year_min=1805&k=5",                    # 25 of 30 maps pass
    "like=4&place=maine&k=4",                        # 10 of 30
    "q=chart&filter=coast&year_max=1820&k=3&page=2",  # 7 of 30, page 2
    "q=roads&year_min=1826&k=5",                     # 4 of 30, fewer than k
    "like=2&filter=maine+coast&year_min=1820&k=2",   # 3 of 30
    "q=relief&place=nowhere&k=3",                    # none
]


@pytest.mark.asyncio
@pytest.mark.parametrize("config,ways", [
    ({}, {"nearest maps filtered"}),  # the first pool (512) holds the whole test collection
    ({"int8_min_rows": 10, "filter_pool": 1}, {"nearest maps filtered", "filter's maps scored exactly"}),
    ({"int8_min_rows": 10, "filter_pool": 1, "exact_subset_rows": 1},
     {"nearest maps filtered", "filter's maps scanned"}),
], ids=["exact", "int8-small-pool", "int8-masked-scan"])
async def test_filtered_search_in_the_index_equals_sqlite_vecs_filtered_knn(collection, tmp_path, config, ways):
    """Each filter kind (years, place, catalogue text, together), answered by the index, equals
    sqlite-vec's filtered KNN, on every way the index can take."""
    copy = changed_copy(collection, tmp_path / "maps.db", "UPDATE maps SET place = 'Maine coast' WHERE id % 3 = 0;")
    plain = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    fast = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": config}})
    await wait_for_index(fast)
    seen = set()
    for query in FILTERED_QUERIES:
        slow = (await plain.client.get(f"/-/mapclip/search.json?{query}")).json()
        quick = (await fast.client.get(f"/-/mapclip/search.json?{query}")).json()
        assert slow["searched_with"] == "sqlite-vec" and quick["searched_with"].startswith("in-memory"), quick
        assert [r["id"] for r in quick["results"]] == [r["id"] for r in slow["results"]], query
        np.testing.assert_allclose([r["similarity"] for r in quick["results"]],
                                   [r["similarity"] for r in slow["results"]], atol=1e-3)
        assert quick["sql"] == slow["sql"]  # the reported SQL reproduces the index's answer
        seen.add(quick["searched_with"].split("(")[1].rstrip(")"))
    assert ways <= seen, seen
    assert len((await fast.client.get("/-/mapclip/search.json?q=roads&year_min=1826&k=5")).json()["results"]) == 4


PLACES = {0: "Évora district", 1: "évora", 2: "Isle Royale", 3: "IsleXRoyale", 4: "100% Maine", 5: "Maine"}


@pytest.mark.asyncio
@pytest.mark.parametrize("place", ["évora", "ÉVORA", "isle_royale", "isle royale", "% maine", "ora", "xr"])
async def test_place_filter_through_the_trigram_index_means_exactly_like(collection, tmp_path, place):
    """``maps_place`` (a trigram index) finds a place's maps without reading every row, yet the
    answer is exactly SQL's ``LIKE`` (ASCII-only case folding, ``_``/``%`` wildcards), with the index,
    without it (a file from before it: sqlite-vec and the index's "scored exactly" way), and again
    once a writer adds it to that older file."""
    sql = "".join(f"UPDATE maps SET place = '{p}' WHERE id % 6 = {r};" for r, p in PLACES.items())
    (tmp_path / "indexed").mkdir()
    (tmp_path / "older").mkdir()
    indexed = changed_copy(collection, tmp_path / "indexed" / "maps.db", sql)
    older = changed_copy(collection, tmp_path / "older" / "maps.db", sql + "DROP TABLE maps_place; DELETE FROM mapclip_meta WHERE key LIKE 'migration:%';")
    conn = open_db(older)
    want = {row[0] for row in conn.execute("SELECT id FROM maps WHERE place LIKE '%' || ? || '%'", (place,))}
    conn.close()
    query = f"/-/mapclip/search.json?q=map&place={urllib.parse.quote(place)}&k=30"
    for path in (indexed, older):
        for config in ({"index": "off"}, {"int8_min_rows": 10, "filter_pool": 1}):
            ds = make_datasette([str(path)], metadata={"plugins": {"datasette-mapclip": config}})
            if config.get("index") != "off":
                await wait_for_index(ds)
            data = (await ds.client.get(query)).json()
            assert {r["id"] for r in data["results"]} == want, (path, config, data["searched_with"])
            uses_index = path == indexed and len(place.replace("_", "%").strip("% ")) >= 3
            assert ("maps_place" in data["sql"]) == uses_index, data["sql"]
    MapStore(older).close()  # a writer opening the older file indexes the places it holds
    conn = open_db(older)
    assert {row[0] for row in conn.execute(
        "SELECT rowid FROM maps_place WHERE place LIKE '%' || ? || '%'", (place,))} >= want
    conn.close()


def test_int8_scan_with_exact_rescoring_finds_the_exact_top_k():
    from datasette_mapclip.search.index import VectorIndex

    rng = np.random.default_rng(0)
    centers = vectors.normalise(rng.standard_normal((50, 64)))
    matrix = vectors.normalise(centers[rng.integers(0, 50, 20000)] + 0.12 * rng.standard_normal((20000, 64)))
    ids = np.arange(1, 20001) * 3
    fast = VectorIndex.build(ids, matrix.astype(np.float32), int8_min_rows=1000, rerank=64)
    exact = VectorIndex.build(ids, matrix.astype(np.float32))
    assert not fast.exact and exact.exact
    hits = 0
    queries = vectors.normalise(centers[rng.integers(0, 50, 50)] + 0.2 * rng.standard_normal((50, 64)))
    for q in queries:
        got_ids, got_scores = fast.search(q, 10)
        want_ids, want_scores = exact.search(q, 10)
        hits += len(set(got_ids) & set(want_ids))
        np.testing.assert_allclose(got_scores[:3], want_scores[:3], atol=1e-5)  # re-scored exactly
    assert hits / 500 >= 0.99
    assert np.allclose(fast.vector_of(int(ids[10])), matrix[10]) and exact.vector_of(2) is None


def many_vectors_copy(collection, tmp_path, rows: int):
    """A copy of the collection with ``rows`` extra maps and random unit vectors (bulk-inserted)."""
    import shutil

    copy = tmp_path / "big.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    model = store.model()
    rng = np.random.default_rng(0)
    matrix = vectors.normalise(rng.standard_normal((rows, model["dim"])).astype(np.float32))
    with store.transaction():
        store.conn.executemany("INSERT INTO maps (id, source_id, source) VALUES (?, ?, 'bulk')",
                               [(1000 + i, f"bulk-{i}") for i in range(rows)])
        store.conn.executemany(f"INSERT INTO [{model['vector_table']}] (map_id, embedding) VALUES (?, ?)",
                               [(1000 + i, matrix[i].tobytes()) for i in range(rows)])
    store.close()
    return copy


@pytest.mark.asyncio
async def test_a_search_cut_by_the_time_limit_answers_503_that_says_so(collection, tmp_path):
    copy = many_vectors_copy(collection, tmp_path, 60_000)
    ds = make_datasette([str(copy)], settings={"sql_time_limit_ms": 1},
                   metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    response = await ds.client.get("/-/mapclip/search.json?like=1&k=5")
    assert response.status_code == 503, response.text
    assert "took longer than this server's 1 ms limit" in response.json()["error"]
    page = await ds.client.get("/-/mapclip?like=1&k=5")
    assert page.status_code == 503 and "took longer" in page.text
    relaxed = make_datasette([str(copy)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    assert (await relaxed.client.get("/-/mapclip/search.json?like=1&k=5")).status_code == 200


@pytest.mark.asyncio
async def test_a_permission_check_cut_by_the_time_limit_is_a_503_on_every_route(collection, monkeypatch):
    # Datasette's own permission checks run SQL under the same time limit; on a busy host a tight
    # limit cuts them rather than the search, and that must be the same 503, not a 500.
    from datasette.database import QueryInterrupted
    ds = make_datasette([str(collection[0])], settings={"sql_time_limit_ms": 50},
                   metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    await ds.invoke_startup()
    assert (await ds.client.get("/-/mapclip/thumbnail/maps/1.jpg")).status_code == 200

    async def cut(*args, **kwargs):
        raise QueryInterrupted(Exception("interrupted"), "select 1", {})

    cut_permission_checks(monkeypatch, ds, cut)
    for path in ("/-/mapclip/search.json?like=1&k=5", "/-/mapclip?like=1&k=5", "/-/mapclip",
                 "/-/mapclip/thumbnail/maps/1.jpg"):
        response = await ds.client.get(path)
        assert response.status_code == 503, (path, response.status_code, response.text[:300])
        assert "took longer than this server's 50 ms limit" in response.text, path


@pytest.mark.asyncio
async def test_errors_carry_their_status(collection, tmp_path):
    copy = changed_copy(collection, tmp_path / "nofts.db",
                        "DROP TRIGGER maps_ai; DROP TRIGGER maps_ad; DROP TRIGGER maps_au; DROP TABLE maps_fts;")
    ds = make_datasette([str(copy)])
    response = await ds.client.get("/-/mapclip/search.json?like=1&filter=vermont")
    assert response.status_code == 400 and "no full-text index" in response.json()["error"]
    missing = await ds.client.get("/-/mapclip/search.json?like=99999")
    assert missing.status_code == 404 and "map 99999 has no vector" in missing.json()["error"]
    no_thumbnail = await ds.client.get("/-/mapclip/thumbnail/nofts/99999.jpg")
    assert no_thumbnail.status_code == 404
    malformed = await ds.client.post("/-/mapclip/search.json", content=b"x" * 100,
                                     headers={"content-type": "multipart/form-data; boundary=zz"})
    assert malformed.status_code == 400 and "malformed" in malformed.json()["error"]


@pytest.mark.asyncio
async def test_similarity_and_combine_of_huge_finite_vectors_stay_finite(ds):
    big = vectors.encode([3e38, 3e38, 0, 0])
    other = vectors.encode([1, 0, 0, 0])
    row = (await sql_json(ds, "select mapclip_similarity(unhex(:a), unhex(:b)) as s, "
                              "hex(mapclip_combine(unhex(:a), 1, unhex(:b), 1)) as v", a=big.hex(), b=other.hex())).json()[0]
    assert row["s"] == pytest.approx(2 ** -0.5, abs=1e-6)
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["v"])),
                               np.array([1 + 2 ** -0.5, 2 ** -0.5, 0, 0]) / np.linalg.norm([1 + 2 ** -0.5, 2 ** -0.5]), atol=1e-6)


@pytest.mark.asyncio
async def test_combine_with_huge_weights_acts_on_their_ratio(ds):
    a, b = vectors.encode([1, 0, 0, 0]), vectors.encode([0, 1, 0, 0])
    row = (await sql_json(ds, "select hex(mapclip_combine(unhex(:a), 1e300, unhex(:b), 2e300)) as huge, "
                              "hex(mapclip_combine(unhex(:a), 1, unhex(:b), 2)) as small", a=a.hex(), b=b.hex())).json()[0]
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["huge"])), vectors.decode(bytes.fromhex(row["small"])),
                               atol=1e-7)
    np.testing.assert_allclose(vectors.decode(bytes.fromhex(row["small"])), np.array([1, 2, 0, 0]) / np.sqrt(5), atol=1e-6)
