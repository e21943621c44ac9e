"""Uploads at the edges: multipart bodies that Datasette 0.65's CSRF layer (asgi-csrf) would fail on
with a 500 are answered 400 first, on every path; an uploaded image is decoded within a small budget."""

from __future__ import annotations

import asyncio
import io
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image
from test_plugin import jpeg

from conftest import SAME_ORIGIN, draw_map, load_collection, make_datasette
from datasette_mapclip.web.views import UPLOAD_PATHS

# The plugin's upload routes, and Datasette's own logout: the CSRF layer reads every one of them.
CSRF_PATHS = [*UPLOAD_PATHS, "/-/logout"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 4)


async def page_token(ds) -> tuple[str, dict]:
    """(the form's csrftoken, a ds_csrftoken cookie).  0.65 signs both; the 1.0 alphas set none, so
    an unsigned cookie stands in (0.65's CSRF layer reads the body for any cookie at all)."""
    page = await ds.client.get("/-/mapclip")
    token = re.search(r'name="csrftoken" value="([^"]*)"', page.text)
    return (token.group(1) if token else ""), {"ds_csrftoken": page.cookies.get("ds_csrftoken") or "unsigned"}


def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "zz") -> bytes:
    """Multipart parts (name, filename or None, data), in order."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def token_first(token: str) -> bytes:
    return form([("csrftoken", None, token.encode()), ("q", None, b"relief"), ("image", "m.jpg", jpeg(draw_map(7)))])


# (content type, body from the page's token, what the 400 says)
HOSTILE = {
    "no-space": ("multipart/form-data;boundary=zz", token_first, "exactly as 'multipart/form-data; boundary=...'"),
    "upper-case-name": ("multipart/form-data; BOUNDARY=zz", token_first, "exactly as"),
    "quoted": ('multipart/form-data; boundary="zz"', token_first, "exactly as"),
    "param-after": ("multipart/form-data; boundary=zz; charset=utf-8", token_first, "exactly as"),
    "no-boundary": ("multipart/form-data", token_first, "multipart/form-data without a boundary"),
    "empty-boundary": ("multipart/form-data; boundary=", token_first, "multipart/form-data without a boundary"),
    "empty-file-first": ("multipart/form-data; boundary=zz",
                         lambda token: form([("image", "empty.png", b""), ("csrftoken", None, token.encode())]),
                         "an empty file part comes before the csrftoken field"),
    "malformed": ("multipart/form-data; boundary=zz", lambda token: b"--zz\r\nnot a form",
                  "the multipart/form-data body is malformed"),
    "preamble": ("multipart/form-data; boundary=zz", lambda token: b"junk\r\n" + token_first(token),
                 "the multipart/form-data body is malformed"),
    "bad-base64": ("multipart/form-data; boundary=zz",
                   lambda token: (b'--zz\r\nContent-Disposition: form-data; name="q"\r\n'
                                  b"Content-Transfer-Encoding: base64\r\n\r\n!!!x\r\n--zz--\r\n"),
                   "the multipart/form-data body is malformed"),
    "token-not-utf8": ("multipart/form-data; boundary=zz", lambda token: form([("csrftoken", None, b"\xff\xfe")]),
                       "the csrftoken field is not UTF-8 text"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", CSRF_PATHS)
@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_multipart_body_the_csrf_layer_cannot_read_is_answered_400_on_every_path(collection, path, case):
    content_type, make_body, message = HOSTILE[case]
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    response = await ds.client.post(path, content=make_body(token), cookies=cookies,
                                    headers={"content-type": content_type, **SAME_ORIGIN})
    assert response.status_code == 400, response.text[:300]
    assert message in response.text
    if path.endswith(".json"):
        assert response.json() == {"ok": False, "error": response.json()["error"], "status": 400}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/-/logout", "/-/mapclip/search.json"])
async def test_the_guard_covers_every_method_the_csrf_layer_checks(collection, path):
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    response = await ds.client.put(path, content=token_first(token), cookies=cookies,
                                   headers={"content-type": "multipart/form-data;boundary=zz", **SAME_ORIGIN})
    assert response.status_code == 400 and "exactly as" in response.text


@pytest.mark.asyncio
async def test_a_browser_shaped_upload_with_a_csrf_cookie_still_searches(collection):
    """The body read ahead for the check is replayed whole, on both upload routes (a guard, not a bug:
    this passed before the guard existed)."""
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    headers = {"content-type": "multipart/form-data; boundary=zz", **SAME_ORIGIN}
    page = await ds.client.post("/-/mapclip", content=token_first(token), cookies=cookies, headers=headers)
    assert page.status_code == 302 and "vector=" in page.headers["location"]
    api = await ds.client.post("/-/mapclip/search.json", content=token_first(token), cookies=cookies, headers=headers)
    assert api.status_code == 200 and len(api.json()["results"]) == 4


@pytest.fixture(scope="module")
def served(collection):
    loop = asyncio.new_event_loop()
    ds = make_datasette([str(collection[0])])
    page = loop.run_until_complete(ds.client.get("/-/mapclip"))
    yield ds, loop, page.cookies.get("ds_csrftoken") or "unsigned"
    loop.close()


content_types = st.one_of(
    st.text(max_size=80).map(lambda rest: "multipart/form-data" + rest),
    st.lists(st.sampled_from(["boundary=zz", "BOUNDARY=zz", ' boundary="zz"', "charset=utf-8", "boundary=", " ", "",
                              "boundary*=utf-8''zz", "boundary=zz zz"]), max_size=3)
    .map(lambda params: ";".join(["multipart/form-data", *params])))
bodies = st.one_of(st.binary(max_size=300), st.lists(st.tuples(
    st.sampled_from(["csrftoken", "q", "image", ""]), st.one_of(st.none(), st.sampled_from(["", "m.png"])),
    st.binary(max_size=20)), max_size=4).map(form))


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content_types, bodies, st.sampled_from(CSRF_PATHS))
def test_with_a_cookie_no_multipart_request_gets_a_5xx(served, content_type, body, path):
    ds, loop, cookie = served
    response = loop.run_until_complete(ds.client.post(
        path, content=body, cookies={"ds_csrftoken": cookie},
        headers={"content-type": content_type.encode("utf-8", "surrogatepass"), **SAME_ORIGIN}))
    assert response.status_code < 500, (response.status_code, response.text[:300])


# --- decoding an uploaded image within a small budget -------------------------------------------

def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def pillow_allocations(fn):
    """(fn's result, bytes of image memory Pillow allocated while it ran: its own accounting)."""
    before = Image.core.get_stats()
    result = fn()
    after = Image.core.get_stats()
    return result, (after["allocated_blocks"] - before["allocated_blocks"]) * Image.core.get_block_size()


def test_decoding_holds_one_full_size_copy_of_the_image():
    from datasette_mapclip.model.images import open_image

    data = png(draw_map(11, (3000, 3000)))  # 36 MB decoded (Pillow keeps RGB in 4 bytes a pixel)
    image, allocated = pillow_allocations(lambda: open_image(data, min_size=224))
    assert image.size == (3000, 3000)
    assert allocated <= 3000 * 3000 * 4 + Image.core.get_block_size()  # a second copy would double it


def test_a_query_image_over_the_decode_budget_is_refused_before_any_pixel_is_decoded():
    from datasette_mapclip.model.images import ImageDecodeError, open_query_image

    data = png(draw_map(12, (1600, 1200)))  # 7.7 MB decoded
    with pytest.raises(ImageDecodeError) as refused:
        pillow_allocations(lambda: open_query_image(data, min_size=224, max_decoded_bytes=4 * 2**20))
    message = str(refused.value)
    assert "1600x1200 PNG takes 7 MB decoded, limit 4 MB" in message
    assert "resize it to at most 1182 px on its longest side" in message
    _, allocated = pillow_allocations(lambda: pytest.raises(ImageDecodeError, open_query_image, data, min_size=224,
                                                            max_decoded_bytes=4 * 2**20))
    assert allocated == 0
    big_jpeg = jpeg(draw_map(12, (4000, 3000)))  # drafted at 1/8 scale: 500 x 375, 0.75 MB
    assert open_query_image(big_jpeg, min_size=224, max_decoded_bytes=4 * 2**20).size == (500, 375)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "L"])
def test_a_query_image_is_reduced_to_about_the_model_size_right_after_decoding(mode):
    from datasette_mapclip.model.images import open_image, open_query_image

    picture = draw_map(13, (2000, 1500))
    data = png(picture.convert("I;16") if mode == "I;16" else picture.convert(mode))
    image = open_query_image(data, min_size=224)
    assert image.mode == "RGB" and image.size == (334, 250)  # 1/6: both sides stay >= 224
    full = open_image(data).resize(image.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(image, float) - np.asarray(full, float)).mean() < 4


def test_a_turned_query_image_is_turned_after_it_is_reduced():
    from datasette_mapclip.model.images import open_image, open_query_image

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # turned 90 degrees clockwise to view
    out = io.BytesIO()
    draw_map(14, (2000, 1500)).save(out, "PNG", exif=exif)
    image = open_query_image(out.getvalue(), min_size=224)
    assert image.size == (250, 334)
    full = open_image(out.getvalue()).resize(image.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(image, float) - np.asarray(full, float)).mean() < 4
