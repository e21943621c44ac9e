"""No request can stall the server: upload bodies are capped and parsed off the event loop with
limits on their parts, and searches that need no model never wait behind model work."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from test_plugin import jpeg, multipart, wait_for_index

from conftest import SAME_ORIGIN, csrf_cookies, draw_map, load_collection, make_datasette
from datasette_mapclip.search import query_vector
from datasette_mapclip.web import uploads
from datasette_mapclip.web.uploads import UploadLimits, limit_upload_bodies


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 12)


def many_parts(count: int, boundary: str = "zzBOUNDARYzz") -> tuple[bytes, str]:
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'.encode()
    return part * count + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def post(ds, body, content_type, **kwargs):
    return await ds.client.post("/-/mapclip/search.json", content=body, headers={"content-type": content_type},
                                **kwargs)


def long_field():
    return multipart({"q": "x" * 20_000}, None)


def long_headers():
    body = b"--zzBOUNDARYzz\r\nX-Pad: " + b"p" * 10_000 + b"\r\n\r\nx\r\n--zzBOUNDARYzz--\r\n"
    return body, "multipart/form-data; boundary=zzBOUNDARYzz"


@pytest.mark.asyncio
@pytest.mark.parametrize("make_body,message", [
    (lambda: many_parts(150_000), "too many parts in the form: more than 64"),
    (lambda: many_parts(65), "too many parts in the form: more than 64"),
    (long_field, "form field 'q' is too long"),
    (long_headers, "headers are too long"),
], ids=["150000-parts", "33-parts", "long-field", "long-headers"])
async def test_hostile_forms_are_refused_with_400_that_says_why(collection, make_body, message):
    body, content_type = make_body()
    response = await post(make_datasette([str(collection[0])]), body, content_type)
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.asyncio
async def test_a_form_within_the_limits_still_searches(collection):
    body, content_type = multipart({f"unused{i}": "v" for i in range(20)} | {"k": "3"}, jpeg(draw_map(3)))
    response = await post(make_datasette([str(collection[0])]), body, content_type)
    assert response.status_code == 200 and len(response.json()["results"]) == 3


@pytest.mark.asyncio
async def test_multipart_is_parsed_off_the_event_loop(collection, monkeypatch):
    threads = []
    real = uploads.parse_multipart

    def spy(*args):
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(uploads, "parse_multipart", spy)
    body, content_type = multipart({"k": "2"}, jpeg(draw_map(4)))
    response = await post(make_datasette([str(collection[0])]), body, content_type)
    assert response.status_code == 200
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.asyncio
async def test_the_body_is_cut_short_before_anything_downstream_parses_it():
    """Datasette's CSRF middleware parses multipart bodies on the event loop when a cookie is sent;
    the plugin's ASGI wrapper sits outside it, so no more than the limits ever reach it."""
    seen = {"bytes": 0}

    async def downstream(scope, receive, send):
        while True:
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen["refused"] = scope[uploads.REFUSED_KEY]

    body, content_type = many_parts(150_000)
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    app = limit_upload_bodies(downstream, ("/-/mapclip/search.json",), UploadLimits)
    scope = {"type": "http", "method": "POST", "path": "/-/mapclip/search.json",
             "headers": [(b"content-type", content_type.encode())]}
    await app(scope, receive, None)
    assert seen["bytes"] <= 65536 < len(body)  # stopped in the first chunk past 33 delimiters
    assert "too many parts" in str(seen["refused"][0])


@pytest.mark.asyncio
async def test_with_a_csrf_cookie_a_hostile_form_is_still_answered_4xx(collection):
    ds = make_datasette([str(collection[0])])
    page = await ds.client.get("/-/mapclip")
    body, content_type = many_parts(150_000)
    response = await ds.client.post("/-/mapclip", content=body, headers={"content-type": content_type, **SAME_ORIGIN},
                                    cookies=csrf_cookies(page))
    assert 400 <= response.status_code < 500


@pytest.mark.asyncio
async def test_an_upload_naming_its_collection_in_the_form_is_refused_before_reading_when_nothing_is_visible(
        collection):
    ds = make_datasette([str(collection[0])], metadata={"databases": {"maps": {"allow": {"id": "root"}}}})
    # a malformed body: read, it would answer 400; refused first, it answers 403
    response = await post(ds, b"--zz\r\nnot a form", "multipart/form-data; boundary=zz")
    assert response.status_code == 403


class HeldModel:
    """Holds the model thread inside a text encoding until released."""

    def __init__(self, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        real = query_vector.text_vectors

        def held_text_vectors(*args):
            self.entered.set()
            self.release.wait(30)
            return real(*args)

        monkeypatch.setattr(query_vector, "text_vectors", held_text_vectors)

    async def start(self, ds):
        self.text_search = asyncio.create_task(ds.client.get("/-/mapclip/search.json?q=roads&k=3"))
        while not self.entered.is_set():
            await asyncio.sleep(0.01)

    async def finish(self):
        assert not self.text_search.done()  # it really was holding the model all along
        self.release.set()
        assert (await self.text_search).status_code == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("index", ["in-memory", "sqlite-vec"])
async def test_more_like_this_never_waits_behind_text_encoding(collection, monkeypatch, index):
    config = {} if index == "in-memory" else {"index": "off"}
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": config}})
    if index == "in-memory":
        await wait_for_index(ds)
    held = HeldModel(monkeypatch)
    await held.start(ds)
    try:
        like = await asyncio.wait_for(ds.client.get("/-/mapclip/search.json?like=2&k=3"), timeout=10)
        assert like.status_code == 200 and like.json()["results"][0]["id"] == 2
        assert like.json()["searched_with"].startswith(index)
    finally:
        await held.finish()


@pytest.mark.asyncio
async def test_a_bad_upload_is_refused_without_waiting_for_the_model(collection, monkeypatch):
    ds = make_datasette([str(collection[0])])
    held = HeldModel(monkeypatch)
    await held.start(ds)
    try:
        body, content_type = multipart({}, jpeg(draw_map(2))[:400])  # a truncated JPEG
        response = await asyncio.wait_for(post(ds, body, content_type), timeout=10)
        assert response.status_code == 400 and "not a usable image" in response.json()["error"]
    finally:
        await held.finish()


def test_the_parser_itself_holds_the_part_limit():
    """The limit holds in the parser too, for bodies that reach it some other way."""
    body, _ = many_parts(70)
    with pytest.raises(uploads.UploadError, match="too many parts in the form: more than 64"):
        uploads.parse_multipart(body, b"zzBOUNDARYzz")
    fields, files = uploads.parse_multipart(many_parts(64)[0], b"zzBOUNDARYzz")
    assert fields == {"f": ["x"] * 64} and files == {}  # a repeated field keeps every value


@pytest.mark.asyncio
async def test_a_refused_upload_closes_the_connection_instead_of_reading_the_rest(collection):
    ds = make_datasette([str(collection[0])])
    body, content_type = many_parts(150_000)
    for route in ("/-/mapclip/search.json", "/-/mapclip"):
        response = await ds.client.post(route, content=body, headers={"content-type": content_type})
        assert response.status_code == 400 and response.headers["connection"] == "close"
    fine = await ds.client.get("/-/mapclip/search.json?like=1&k=2")
    assert "connection" not in fine.headers


@pytest.mark.asyncio
async def test_a_statement_cut_by_the_time_limit_anywhere_answers_503(collection, monkeypatch):
    """Not only the KNN: any statement of a request that SQLite interrupts (here the model lookup)."""
    from datasette_mapclip import store

    class Interrupted(Exception):
        sqlite_errorcode = store.SQLITE_INTERRUPT

    def interrupted(conn):
        raise Interrupted("interrupted")

    ds = make_datasette([str(collection[0])])
    assert (await ds.client.get("/-/mapclip/search.json?like=1&k=2")).status_code == 200
    monkeypatch.setattr(store, "read_models", interrupted)
    for path in ("/-/mapclip/search.json?like=1&k=2", "/-/mapclip?like=1&k=2"):
        response = await ds.client.get(path)
        assert response.status_code == 503, (path, response.text[:300])
        assert "took longer than this server" in response.text


@pytest.mark.asyncio
@pytest.mark.parametrize("after_limit", [True, False])
async def test_a_vector_scan_cut_inside_sqlite_vec_answers_503(collection, monkeypatch, after_limit):
    """sqlite-vec reports a scan interrupted between two chunk reads as "chunks iter error"
    (SQLITE_ERROR, not SQLITE_INTERRUPT: seen on a 562,842-map file whose scan outlasts the limit),
    so that error after the time limit is the limit's 503; before it, it is a fault of the file."""
    import asyncio

    import datasette.database

    from datasette_mapclip.store import connect

    real_execute = datasette.database.Database.execute
    sqlite_error = type(connect(":memory:")).__module__  # the driver Datasette uses (pysqlite3 here)
    error_class = __import__(sqlite_error, fromlist=["OperationalError"]).OperationalError

    async def scan_cut(self, sql, *args, **kwargs):
        if "MATCH" in sql and "distance" in sql:  # the KNN of a search
            if after_limit:
                await asyncio.sleep(0.06)
            raise error_class("chunks iter error")
        return await real_execute(self, sql, *args, **kwargs)

    ds = make_datasette([str(collection[0])], settings={"sql_time_limit_ms": 50},
                        metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    monkeypatch.setattr(datasette.database.Database, "execute", scan_cut)
    for path in ("/-/mapclip/search.json?like=1&k=2", "/-/mapclip?like=1&k=2"):
        response = await ds.client.get(path)
        if after_limit:
            assert response.status_code == 503, (path, response.text[:300])
            assert "took longer than this server" in response.text and "50 ms limit" in response.text
        else:
            assert response.status_code == 400, (path, response.text[:300])
            assert "chunks iter error" in response.text and "took longer" not in response.text


@pytest.mark.asyncio
async def test_text_queries_waiting_together_are_encoded_in_one_pass(collection, monkeypatch, tiny_encoder):
    from datasette_mapclip.store import MapStore

    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    held = HeldModel(monkeypatch)
    batches = []
    holding = query_vector.text_vectors

    def counted(encoder, texts, config):
        batches.append(list(texts))
        return holding(encoder, texts, config)

    monkeypatch.setattr(query_vector, "text_vectors", counted)
    await held.start(ds)  # the first text search holds the model thread
    queries = ["relief", "a nautical chart with soundings", "city plan", "roads and railways of the county", "x"]
    waiting = [asyncio.create_task(ds.client.get(f"/-/mapclip/search.json?q={q}&k=4")) for q in queries]
    await asyncio.sleep(0.5)
    await held.finish()
    answers = [(await task).json() for task in waiting]
    assert sorted(len(b) for b in batches)[-1] == len(queries), batches  # the waiting five, in one pass
    ids, matrix = MapStore(collection[0]).vectors()
    for query, answer in zip(queries, answers):  # padding to the longest query changes nothing
        expected = tiny_encoder.encode_texts([query])[0]
        want = [int(ids[i]) for i in np.argsort(-(matrix @ expected))[:4]]
        assert [r["id"] for r in answer["results"]] == want, query


# The documented cap on results per page (datasette_mapclip/search/query.py MAX_K), written out here so
# that raising the constant is caught rather than followed.
K_CAP = 200


@pytest.mark.asyncio
@pytest.mark.parametrize("route", ["/-/mapclip", "/-/mapclip/search.json", "/-/mapclip/export.csv",
                                   "/-/mapclip/export.json"])
@pytest.mark.parametrize("index", ["in-memory", "sqlite-vec"])
async def test_k_is_capped_at_200_on_every_route(collection, route, index):
    config = {} if index == "in-memory" else {"index": "off"}
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": config}})
    if index == "in-memory":
        await wait_for_index(ds)
    over = await ds.client.get(f"{route}?like=2&k={K_CAP + 1}")
    assert over.status_code == 400, (route, over.status_code, over.text[:300])
    assert f"k must be between 1 and {K_CAP}, got {K_CAP + 1}" in over.text
    at_cap = await ds.client.get(f"{route}?like=2&k={K_CAP}")
    assert at_cap.status_code == 200, (route, at_cap.status_code, at_cap.text[:300])
    if route.endswith("search.json"):  # the whole (12-map) collection, nearest first
        results = at_cap.json()["results"]
        assert len(results) == 12 and results[0]["id"] == 2
    elif route.endswith("export.json"):
        assert len(at_cap.json()["rows"]) == 12
    elif route.endswith("export.csv"):
        assert len(at_cap.text.strip().splitlines()) == 13  # the header and every map
    else:
        assert at_cap.text.count('<li class="mapclip-card"') == 12
