"""Uploads at the edges: on Datasette 0.65 the plugin makes the CSRF check of every multipart form
itself (Datasette's CSRF layer fails on many with a 500, and cannot run on python-multipart 0.0.25 and
later); bad forms are answered 4xx on every path; an uploaded image is decoded within a small budget."""

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

from conftest import DATASETTE_1, SAME_ORIGIN, draw_map, load_collection, make_datasette
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


# Content types Datasette 0.65's CSRF layer would have failed on with a 500 (it splits the header on
# "; boundary="): the plugin's own check reads them the standard way, so the upload searches.
ODD_BUT_VALID = {
    "no-space": "multipart/form-data;boundary=zz",
    "upper-case-name": "multipart/form-data; BOUNDARY=zz",
    "quoted": 'multipart/form-data; boundary="zz"',
    "param-after": "multipart/form-data; boundary=zz; charset=utf-8",
}

# (content type, body from the page's token, the status, what the answer says)
HOSTILE = {
    "no-boundary": ("multipart/form-data", token_first, 400, "multipart/form-data without a boundary"),
    "empty-boundary": ("multipart/form-data; boundary=", token_first, 400, "multipart/form-data without a boundary"),
    "empty-file-first": ("multipart/form-data; boundary=zz",
                         lambda token: form([("image", "empty.png", b""), ("csrftoken", None, token.encode())]),
                         403, "a file comes before the form's csrftoken field"),
    "malformed": ("multipart/form-data; boundary=zz", lambda token: b"--zz\r\nnot a form", 400,
                  "the multipart/form-data body is malformed"),
    "bad-base64": ("multipart/form-data; boundary=zz",
                   lambda token: (b'--zz\r\nContent-Disposition: form-data; name="q"\r\n'
                                  b"Content-Transfer-Encoding: base64\r\n\r\n!!!x\r\n--zz--\r\n"),
                   403, "does not match its ds_csrftoken cookie"),
    "token-not-utf8": ("multipart/form-data; boundary=zz", lambda token: form([("csrftoken", None, b"\xff\xfe")]),
                       403, "does not match its ds_csrftoken cookie"),
    "wrong-token": ("multipart/form-data; boundary=zz", lambda token: token_first(token[:-2] + "xx"),
                    403, "does not match its ds_csrftoken cookie"),
    "token-too-late": ("multipart/form-data; boundary=zz",
                       lambda token: form([("pad", None, b"p" * 30_000)] * 40 + [("csrftoken", None, token.encode())]),
                       413, "csrftoken field must come within its first"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", CSRF_PATHS)
@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_multipart_form_that_fails_the_check_is_answered_4xx_on_every_path(collection, path, case):
    """0.65: the plugin's check, with Datasette's CSRF layer's rules, on every path; 1.0 checks the
    Sec-Fetch-Site header instead, so there only what the upload routes themselves refuse is asked."""
    content_type, make_body, status, message = HOSTILE[case]
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    response = await ds.client.post(path, content=make_body(token), cookies=cookies,
                                    headers={"content-type": content_type, **SAME_ORIGIN})
    if DATASETTE_1:
        assert response.status_code < 500, response.text[:300]
        return
    assert response.status_code == status, response.text[:300]
    assert message in response.text
    if path.endswith(".json"):
        assert response.json() == {"ok": False, "error": response.json()["error"], "status": status}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", UPLOAD_PATHS)
@pytest.mark.parametrize("case", list(ODD_BUT_VALID))
async def test_an_upload_with_any_valid_multipart_header_searches(collection, path, case):
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    response = await ds.client.post(path, content=token_first(token), cookies=cookies,
                                    headers={"content-type": ODD_BUT_VALID[case], **SAME_ORIGIN})
    if path.endswith(".json"):
        assert response.status_code == 200 and len(response.json()["results"]) == 4, response.text[:300]
    else:
        assert response.status_code == 302 and "vector=" in response.headers["location"]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/-/logout", "/-/mapclip/search.json"])
async def test_the_check_covers_every_method_the_csrf_layer_checks(collection, path):
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    response = await ds.client.put(path, content=token_first(token[:-2] + "xx"), cookies=cookies,
                                   headers={"content-type": "multipart/form-data;boundary=zz", **SAME_ORIGIN})
    if DATASETTE_1:  # no form token there: the route answers for itself
        assert response.status_code < 500, response.text[:300]
    else:
        assert response.status_code == 403 and "does not match" in response.text


@pytest.mark.asyncio
async def test_a_browser_shaped_upload_with_a_csrf_cookie_still_searches(collection, monkeypatch):
    """The body read ahead for the check is replayed whole, on both upload routes; on 0.65 the
    CSRF layer is told the form is checked and never parses a multipart body itself (its parser call
    does not run on python-multipart 0.0.25 and later)."""
    parsed = []
    if not DATASETTE_1:
        import asgi_csrf

        monkeypatch.setattr(asgi_csrf, "_parse_multipart_form_data", lambda *args: parsed.append(args))
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    headers = {"content-type": "multipart/form-data; boundary=zz", **SAME_ORIGIN}
    page = await ds.client.post("/-/mapclip", content=token_first(token), cookies=cookies, headers=headers)
    assert page.status_code == 302 and "vector=" in page.headers["location"]
    api = await ds.client.post("/-/mapclip/search.json", content=token_first(token), cookies=cookies, headers=headers)
    assert api.status_code == 200 and len(api.json()["results"]) == 4
    assert parsed == []


@pytest.mark.asyncio
async def test_another_plugins_csrf_exemption_is_kept(collection):
    """A path another plugin exempts with ``skip_csrf`` (an API taking multipart with its own auth)
    gets no token check from this plugin either (0.65; the 1.0 alphas have no such hook)."""
    from datasette import hookimpl
    from datasette.plugins import pm

    class Exempt:
        @hookimpl
        def skip_csrf(self, datasette, scope):
            return scope["path"] == "/-/mapclip/search.json"

    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    body = form([("q", None, b"relief"), ("image", "m.jpg", jpeg(draw_map(7)))])  # no token at all
    headers = {"content-type": "multipart/form-data; boundary=zz", **SAME_ORIGIN}
    refused = await ds.client.post("/-/mapclip/search.json", content=body, cookies=cookies, headers=headers)
    assert refused.status_code == (200 if DATASETTE_1 else 403), refused.text[:300]
    if not DATASETTE_1:
        pm.register(Exempt(), name="exempt-search")
    try:
        allowed = await ds.client.post("/-/mapclip/search.json", content=body, cookies=cookies, headers=headers)
    finally:
        if not DATASETTE_1:
            pm.unregister(name="exempt-search")
    assert allowed.status_code == 200, allowed.text[:300]


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


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=60), st.sampled_from(["get", "post"]),
       st.sampled_from(["/", "/-/mapclip", "/-/mapclip/search.json?q=x", "/-/versions.json", "/-/logout"]))
def test_any_cookie_header_is_answered_without_a_5xx(served, cookie, method, path):
    """Datasette 0.65's CSRF layer decodes every request's Cookie header as UTF-8 and parses it
    with nothing caught: a header of other bytes was a 500 on every page."""
    ds, loop, _ = served
    headers = {"cookie": b"ds_csrftoken=" + cookie, **SAME_ORIGIN}
    if method == "post":
        headers["content-type"] = "multipart/form-data; boundary=zz"
    response = loop.run_until_complete(getattr(ds.client, method)(
        path, headers=headers, **({"content": b"--zz--\r\n"} if method == "post" else {})))
    assert response.status_code < 500, (cookie, method, path, response.status_code, response.text[:200])


@pytest.mark.asyncio
async def test_an_uploaded_picture_is_shown_back_only_to_the_browser_that_uploaded_it(collection):
    """The page shows an uploader the picture they searched with; the same search URL opened by
    anyone else (no uploader cookie, or another one) says an uploaded picture is used and shows none."""
    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    posted = await ds.client.post("/-/mapclip", content=token_first(token), cookies=cookies,
                                  headers={"content-type": "multipart/form-data; boundary=zz", **SAME_ORIGIN})
    assert posted.status_code == 302
    uploader = posted.cookies.get("mapclip_uploader")
    assert uploader and re.fullmatch(r"[0-9a-f]{32}", uploader)
    assert "httponly" in posted.headers["set-cookie"].lower()
    url = posted.headers["location"]
    mine = await ds.client.get(url, cookies={**cookies, "mapclip_uploader": uploader})
    assert mine.status_code == 200 and 'class="mapclip-upload-preview"' in mine.text
    assert "data:image/jpeg;base64," in mine.text
    for other in ({}, {"mapclip_uploader": "0" * 32}, {"mapclip_uploader": "<script>"}):
        theirs = await ds.client.get(url, cookies={**cookies, **other})
        assert theirs.status_code == 200 and "data:image/jpeg;base64," not in theirs.text, other
        assert theirs.text.count('class="mapclip-card"') == mine.text.count('class="mapclip-card"') == 4
    # a browser that has its cookie keeps it: no new one is set
    again = await ds.client.post("/-/mapclip", content=token_first(token),
                                 cookies={**cookies, "mapclip_uploader": uploader},
                                 headers={"content-type": "multipart/form-data; boundary=zz", **SAME_ORIGIN})
    assert again.status_code == 302 and "mapclip_uploader" not in again.headers.get("set-cookie", "")


@pytest.mark.asyncio
@pytest.mark.parametrize("declared", [True, False])
async def test_a_form_body_too_large_for_the_csrf_layer_is_refused_before_it_is_held(collection, declared):
    """Datasette 0.65's CSRF layer reads a whole form body into memory to find its token: the
    plugin refuses one over MAX_FORM_BODY_BYTES first (declared, or counted as it streams); a
    normal-sized form still reaches Datasette."""
    from datasette_mapclip.web.uploads import MAX_FORM_BODY_BYTES

    ds = make_datasette([str(collection[0])])
    token, cookies = await page_token(ds)
    chunk = b"q=" + b"a" * (1024 * 1024 - 2)
    total = MAX_FORM_BODY_BYTES // len(chunk) + 6
    sent = []

    async def stream():
        for _ in range(total):
            sent.append(len(chunk))
            yield chunk

    headers = {"content-type": "application/x-www-form-urlencoded", **SAME_ORIGIN}
    big = await ds.client.post("/-/logout", content=chunk * total if declared else stream(), cookies=cookies,
                               headers=headers)
    small = await ds.client.post("/-/logout", content=f"csrftoken={token}".encode(), cookies=cookies, headers=headers)
    if DATASETTE_1:  # no CSRF layer reading bodies there
        assert big.status_code < 500 and small.status_code < 500
        return
    assert big.status_code == 413 and "too large" in big.text
    if not declared:
        assert sum(sent) <= MAX_FORM_BODY_BYTES + 2 * len(chunk)  # stopped reading near the cap
    assert small.status_code in (200, 302), small.text[:200]
