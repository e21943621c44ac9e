"""Property-based: arbitrary values in every search parameter, route segment, upload body and SQL
function argument get an answer below 500 and never a traceback (Hypothesis generates the values)."""

from __future__ import annotations

import asyncio
import os
import struct
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_collection, make_datasette

SEARCH_PARAMETERS = ["q", "like", "vector", "weight", "k", "page", "year_min", "year_max", "place", "filter",
                     "model", "_db"]
# Deterministic by default, so a test run (and CI) is reproducible; MAPCLIP_HYPOTHESIS_EXPLORE=1
# draws new examples each run, to go looking for new failures.
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    derandomize=not os.environ.get("MAPCLIP_HYPOTHESIS_EXPLORE"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values a hostile or careless client sends: any text, numbers far out of range, hex, NaN spellings.
# The edges where types change: 32/63/64-bit integers, SQLite's limits, floats past float32.
EDGES = [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**20, 10**40]
numbers = st.one_of(st.integers(), st.sampled_from(EDGES + [-e for e in EDGES]),
                    st.integers(min_value=2**62, max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True)).map(str)
# short blobs, and blobs of model-sized vectors (the tiny test model's and ViT-B-32's 512 floats)
finite_floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
hexes = st.one_of(st.binary(max_size=64), st.binary(min_size=2000, max_size=2600),
                  st.sampled_from([64, 128, 512]).flatmap(lambda n: st.lists(finite_floats, min_size=n, max_size=n))
                  .map(lambda xs: struct.pack(f"<{len(xs)}f", *xs))).map(bytes.hex)
values = st.one_of(st.text(max_size=300), numbers, hexes, st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10",
                                                                              "maps", "_internal", "", " ", "\x00"]))


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 10)
    loop = asyncio.new_event_loop()
    ds = make_datasette([str(db_path)])
    yield ds, loop
    loop.close()


def request(served, method, path, **kwargs):
    ds, loop = served
    return loop.run_until_complete(getattr(ds.client, method)(path, **kwargs))


def assert_answered(response):
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text


@PROPERTY
@given(st.dictionaries(st.sampled_from(SEARCH_PARAMETERS), values, max_size=6),
       st.sampled_from(["/-/mapclip/search.json", "/-/mapclip"]))
def test_search_parameters_never_give_5xx(served, args, route):
    response = request(served, "get", route + "?" + urllib.parse.urlencode(args))
    assert_answered(response)
    if route.endswith(".json") and response.status_code >= 400:
        assert response.json()["ok"] is False and response.json()["error"]


@PROPERTY
@given(st.one_of(st.just("maps"), st.text(max_size=80), values), st.one_of(st.text(max_size=40), numbers))
def test_thumbnail_route_segments_never_give_5xx(served, database, map_id):
    path = f"/-/mapclip/thumbnail/{urllib.parse.quote(database, safe='')}/{urllib.parse.quote(map_id, safe='')}.jpg"
    assert_answered(request(served, "get", path))


SQL_CALLS = [
    "select mapclip_embed_text(:a)",
    "select mapclip_embed_text(:a, :b)",
    "select mapclip_embed_image(unhex(:a))",
    "select mapclip_embed_image(:a)",
    "select mapclip_similarity(unhex(:a), unhex(:b))",
    "select mapclip_similarity(unhex(:a), unhex(:a))",  # same length: reaches the arithmetic
    "select mapclip_combine(unhex(:a), :w, unhex(:a), :v)",
    "select mapclip_similarity(:a, :b)",
    "select mapclip_combine(unhex(:a), :w, unhex(:b), :v)",
    "select mapclip_combine(unhex(:a), :w)",
    "select mapclip_combine(:a, :b, :w)",
    "select mapclip_combine()",
]


@PROPERTY
@given(st.sampled_from(SQL_CALLS), values, values, values, values)
def test_sql_functions_never_give_5xx(served, sql, a, b, w, v):
    query = urllib.parse.urlencode({"sql": sql, "a": a, "b": b, "w": w, "v": v, "_shape": "array"})
    assert_answered(request(served, "get", "/maps.json?" + query, follow_redirects=True))


fields = st.dictionaries(st.sampled_from(SEARCH_PARAMETERS + ["image", "csrftoken", "x"]), values, max_size=5)


@PROPERTY
@given(fields, st.binary(max_size=2048), st.sampled_from(["image", "other"]), st.booleans())
def test_upload_bodies_never_give_5xx(served, form, payload, file_field, mangle):
    boundary = "hyp0thesis"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{urllib.parse.quote(k)}"\r\n\r\n'
                    .encode() + v.encode("utf-8", "surrogatepass") + b"\r\n" for k, v in form.items())
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="m.jpg"\r\n\r\n'
             .encode() + payload + f"\r\n--{boundary}--\r\n".encode())
    if mangle:  # a broken frame somewhere in the body
        body = body[: len(body) // 2] + payload[:16] + body[len(body) // 2 + 7:]
    response = request(served, "post", "/-/mapclip/search.json",
                       content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_answered(response)


content_types = st.one_of(st.text(max_size=120), st.text(max_size=60).map(lambda b: f"multipart/form-data; boundary={b}"),
                          st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=",
                                           "application/x-www-form-urlencoded", "image/jpeg"]))


@PROPERTY
@given(st.binary(max_size=512), content_types)
def test_any_body_and_content_type_never_give_5xx(served, body, content_type):
    headers = {"content-type": content_type.encode("utf-8", "surrogatepass")}  # raw bytes, as a client may send
    for route in ("/-/mapclip/search.json", "/-/mapclip"):
        assert_answered(request(served, "post", route, content=body, headers=headers))


# -- ids: digits of other scripts ("²".isdigit() is true, int("²") fails; int() reads Arabic-Indic
# digits), and digit strings longer than any id (and than int()'s 4,300-digit limit)
odd_digits = st.text(alphabet=st.sampled_from("0123456789²³¹١٢٣۴५๖０𝟗"), min_size=1, max_size=30)
long_digits = st.integers(min_value=20, max_value=6000).map(lambda n: "9" * n)
odd_ids = st.one_of(odd_digits, long_digits, numbers)
ID_PARAMETERS = st.sampled_from(["like", "more", "fewer", "term", "k", "page", "year_min", "year_max"])


@PROPERTY
@given(ID_PARAMETERS, odd_ids, st.sampled_from(["/-/mapclip/search.json", "/-/mapclip", "/-/mapclip/export.csv"]))
def test_odd_ids_in_parameters_never_give_5xx(served, name, value, route):
    value = f"map:{value}" if name == "term" else value
    assert_answered(request(served, "get", route + "?" + urllib.parse.urlencode({"q": "a map", name: value})))


@PROPERTY
@given(odd_ids, st.sampled_from(["", ".json", ".bib", ".csl.json", ".txt"]))
def test_odd_ids_in_paths_never_give_5xx(served, map_id, suffix):
    quoted = urllib.parse.quote(map_id, safe="")
    assert_answered(request(served, "get", f"/-/mapclip/map/maps/{quoted}{suffix}"))
    assert_answered(request(served, "get", f"/-/mapclip/thumbnail/maps/{quoted}.jpg"))


# -- rows another tool edited: any column of a map, any type SQLite will store there
MAP_COLUMNS = ["sheet", "title", "date", "year", "place", "subjects", "contributors", "notes", "format", "item_url",
               "image_url", "location", "thumbnail_url", "thumbnail", "width", "height", "loaded_at", "source"]
cell_values = st.one_of(st.none(), st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(allow_nan=False),
                        st.text(max_size=40), st.binary(max_size=40),
                        st.sampled_from(["two", "abc", "", "1e999", "javascript:alert(1)", b"\xff\xfe", b"\x00"]))


@pytest.fixture(scope="module")
def edited(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 6)
    loop = asyncio.new_event_loop()
    yield db_path, make_datasette([str(db_path)]), loop
    loop.close()


@settings(PROPERTY, max_examples=60)
@given(st.sampled_from(MAP_COLUMNS), cell_values)
def test_rows_of_any_type_never_give_5xx(edited, column, value):
    from datasette_mapclip.store import sqlite3_module

    db_path, ds, loop = edited
    conn = sqlite3_module().connect(str(db_path))
    try:
        conn.execute(f"UPDATE maps SET [{column}] = ? WHERE id = 3", (value,))
        conn.commit()
    finally:
        conn.close()
    paths = [f"/-/mapclip/map/maps/3{suffix}" for suffix in ("", ".json", ".bib", ".csl.json", ".txt")]
    paths += ["/-/mapclip/thumbnail/maps/3.jpg", "/-/mapclip?like=3", "/-/mapclip/search.json?like=3",
              "/-/mapclip/export.csv?like=3", "/-/mapclip/export.json?like=3"]
    for path in paths:
        assert_answered(loop.run_until_complete(ds.client.get(path)))


# -- multipart headers the CSRF layer cannot read, sent with its cookie (Datasette's own routes too)
boundary_names = st.sampled_from(["boundary", "BOUNDARY", "Boundary", "charset", ""])
separators = st.sampled_from(["; ", ";", " ;  ", ";\t", ",", ""])
content_type_variants = st.one_of(
    st.tuples(st.sampled_from(["multipart/form-data", "Multipart/Form-Data", "multipart/mixed"]), separators,
              boundary_names, st.sampled_from(["=zz", '="zz"', "=", "", "=zz; x=y"])).map("".join),
    content_types)


@PROPERTY
@given(content_type_variants, st.binary(max_size=300), st.booleans(),
       st.sampled_from(["/-/mapclip", "/-/mapclip/search.json", "/-/logout"]),
       st.sampled_from(["abc", "\u00e9t\u00e9", "", "a b"]))
def test_multipart_variants_with_the_csrf_cookie_never_give_5xx(served, content_type, payload, empty_file_first, route,
                                                                cookie):
    body = b"--zz\r\n"
    if empty_file_first:
        body += b'Content-Disposition: form-data; name="image"; filename=""\r\n\r\n\r\n--zz\r\n'
    body += b'Content-Disposition: form-data; name="csrftoken"\r\n\r\n' + payload + b"\r\n--zz--\r\n"
    headers = {"content-type": content_type.encode("utf-8", "surrogatepass"),
               "cookie": f"ds_csrftoken={cookie}".encode()}
    assert_answered(request(served, "post", route, content=body, headers=headers))
