"""A collection file carries its query encoders (ONNX towers, tokenizer, preprocessing): a server
answers text, image-upload and "more like this" searches, and the SQL functions, with torch and
open_clip impossible to import and no network, and gets the vectors open_clip gets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import load_collection, make_datasette
from datasette_mapclip.store import read_query_encoders
from datasette_mapclip.store.schema import connect

SERVE_WITHOUT_TORCH = textwrap.dedent("""
    import asyncio, importlib.abc, json, re, socket, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "open_clip", "timm"):
                raise ImportError(f"blocked by the test: {name}")

    sys.meta_path.insert(0, NoTorch())
    real_connect = socket.socket.connect

    def no_network(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network blocked by the test: {address}")
        return real_connect(self, address)

    socket.socket.connect = no_network
    sys.path.insert(0, "tests")
    from conftest import make_datasette

    DB, IMAGE = sys.argv[1], sys.argv[2]

    async def main():
        ds = make_datasette([DB])
        out = {}
        text = await ds.client.get("/-/mapclip/search.json?q=relief+map&k=5")
        out["text"] = text.json()
        out["like"] = (await ds.client.get("/-/mapclip/search.json?like=2&k=5")).json()
        page = await ds.client.get("/-/mapclip")
        token = re.search(r'name="csrftoken" value="([^"]*)"', page.text)
        cookies = {"ds_csrftoken": page.cookies.get("ds_csrftoken") or "unsigned"}
        body = (b"--zz\\r\\nContent-Disposition: form-data; name=\\"csrftoken\\"\\r\\n\\r\\n"
                + (token.group(1) if token else "").encode()
                + b"\\r\\n--zz\\r\\nContent-Disposition: form-data; name=\\"k\\"\\r\\n\\r\\n5"
                + b"\\r\\n--zz\\r\\nContent-Disposition: form-data; name=\\"image\\"; filename=\\"q.png\\"\\r\\n\\r\\n"
                + open(IMAGE, "rb").read() + b"\\r\\n--zz--\\r\\n")
        upload = await ds.client.post("/-/mapclip/search.json", content=body, cookies=cookies,
                                      headers={"content-type": "multipart/form-data; boundary=zz",
                                               "sec-fetch-site": "same-origin"})
        out["upload"] = upload.json()
        sql = await ds.client.get("/maps.json?sql=select+hex(mapclip_embed_text('nautical+chart'))+as+v&_shape=array")
        out["sql"] = sql.json()
        out["torch_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip"))
        print(json.dumps(out))

    asyncio.run(main())
""")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 12, fp32_encoders=False)  # as a default load stores them


def test_the_loaded_file_carries_its_query_encoders(collection):
    conn = connect(collection[0])
    rows = {row["part"]: row for row in read_query_encoders(conn)}
    conn.close()
    assert set(rows) == {"text", "image", "tokenizer", "preprocess"}
    check = json.loads(rows["text"]["checked"])
    assert check["texts"] >= 500 and check["images"] >= 100 and check["threshold"] == 0.995
    for tower in ("text", "image"):  # int8 only where the check passed, and the figures say so
        assert (rows[tower]["precision"] == "int8") == (check["int8_min_cosine"][tower] >= 0.995)
        assert check["fp32_min_cosine"][tower] >= 0.9999


def test_the_query_towers_do_not_busy_wait_between_queries(collection):
    """ONNX Runtime's threads spin after each run by default, taking the cores the index scan and
    the server need next: the stored towers run with spinning off."""
    from datasette_mapclip.model.query_encoders import QueryEncoder
    from datasette_mapclip.store import StoredQueryEncoders, read_models_at

    model = read_models_at(str(collection[0]), immutable=False)[0]
    parts, precisions = StoredQueryEncoders(collection[0], model["name"]).parts()
    encoder = QueryEncoder(parts, precisions, threads=2)
    for session in (encoder.text_session, encoder.image_session):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


async def test_a_server_searches_without_torch_and_without_network(collection, tmp_path):
    from conftest import draw_map

    picture = tmp_path / "query.png"
    draw_map(5).save(picture)
    run = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TORCH, str(collection[0]), str(picture)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["torch_imported"] == []
    for kind in ("text", "like", "upload"):
        assert out[kind]["ok"], (kind, out[kind])
        assert len(out[kind]["results"]) == 5

    # the same searches on a server that encodes with open_clip (torch): the same vectors, near enough
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"query_encoders": "torch"}}})
    torch_text = (await ds.client.get("/-/mapclip/search.json?q=relief+map&k=5")).json()
    assert [r["id"] for r in torch_text["results"]][:3] == [r["id"] for r in out["text"]["results"]][:3]
    like = (await ds.client.get("/-/mapclip/search.json?like=2&k=5")).json()
    assert like["results"] == out["like"]["results"]  # no model involved: identical
    sql = (await ds.client.get("/maps.json?sql=select+hex(mapclip_embed_text('nautical+chart'))+as+v&_shape=array")).json()
    stored_vector = np.frombuffer(bytes.fromhex(out["sql"][0]["v"]), "<f4")
    torch_vector = np.frombuffer(bytes.fromhex(sql[0]["v"]), "<f4")
    assert float(stored_vector @ torch_vector) >= 0.995


@pytest.mark.parametrize("damage,why", [
    ("UPDATE encoder_files SET data = X'00' || data WHERE sha256 = (SELECT sha256 FROM query_encoders "
     "WHERE part = 'text')", "altered"),
    ("DELETE FROM encoder_files WHERE sha256 = (SELECT sha256 FROM query_encoders WHERE part = 'tokenizer')",
     "missing"),
    # intact files that do not fit together: the image tower stored as the text tower
    ("UPDATE query_encoders SET sha256 = (SELECT sha256 FROM query_encoders WHERE part = 'image') "
     "WHERE part = 'text'", "the stored text encoder failed"),
])
async def test_a_damaged_encoder_answers_503_with_the_reason_and_nothing_else_breaks(collection, tmp_path, damage,
                                                                                      why):
    import shutil
    import sqlite3

    damaged = tmp_path / "damaged.db"
    shutil.copy(collection[0], damaged)
    conn = sqlite3.connect(damaged)
    conn.execute(damage)
    conn.commit()
    conn.close()
    before = damaged.read_bytes()
    ds = make_datasette([str(damaged), str(collection[0])])
    text = await ds.client.get("/-/mapclip/search.json?q=relief&_db=damaged")
    assert text.status_code == 503 and why in text.json()["error"], text.text
    assert (await ds.client.get("/-/mapclip/search.json?like=1&k=3&_db=damaged")).status_code == 200
    assert (await ds.client.get("/-/mapclip/search.json?q=relief&k=3&_db=maps")).status_code == 200
    assert damaged.read_bytes() == before  # a server never rewrites the file


async def test_an_image_tower_that_cannot_load_fails_only_uploads_with_the_reason(collection, tmp_path):
    """The image tower is opened at the first image query: text searches never wait for it, and one
    ONNX Runtime cannot load (intact by its SHA-256) answers an upload 503 saying why."""
    import hashlib
    import io
    import shutil
    import sqlite3

    from conftest import draw_map

    broken = b"not an onnx graph"
    damaged = tmp_path / "image-broken.db"
    shutil.copy(collection[0], damaged)
    conn = sqlite3.connect(damaged)
    digest = hashlib.sha256(broken).hexdigest()
    conn.execute("INSERT INTO encoder_files (sha256, data) VALUES (?, ?)", (digest, broken))
    conn.execute("UPDATE query_encoders SET sha256 = ? WHERE part = 'image'", (digest,))
    conn.commit()
    conn.close()
    ds = make_datasette([str(damaged)])
    assert (await ds.client.get("/-/mapclip/search.json?q=relief&k=3")).status_code == 200
    picture = io.BytesIO()
    draw_map(2).save(picture, "PNG")
    body = (b'--zz\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'
            + picture.getvalue() + b"\r\n--zz--\r\n")
    upload = await ds.client.post("/-/mapclip/search.json", content=body,
                                  headers={"content-type": "multipart/form-data; boundary=zz",
                                           "sec-fetch-site": "same-origin"})
    assert upload.status_code == 503 and "the stored image encoder failed to load" in upload.json()["error"]
    assert (await ds.client.get("/-/mapclip/search.json?q=chart&k=3")).status_code == 200

    # an image tower altered in the file after it was stored: read (and checked) only at the first
    # image query, so text searches answer and the upload is told why
    altered = tmp_path / "image-altered.db"
    shutil.copy(collection[0], altered)
    conn = sqlite3.connect(altered)
    conn.execute("UPDATE encoder_files SET data = X'00' || data WHERE sha256 = (SELECT sha256 FROM query_encoders "
                 "WHERE part = 'image')")
    conn.commit()
    conn.close()
    ds = make_datasette([str(altered)])
    assert (await ds.client.get("/-/mapclip/search.json?q=relief&k=3")).status_code == 200
    upload = await ds.client.post("/-/mapclip/search.json", content=body,
                                  headers={"content-type": "multipart/form-data; boundary=zz",
                                           "sec-fetch-site": "same-origin"})
    assert upload.status_code == 503 and "altered" in upload.json()["error"], upload.text


def test_fp32_encoders_are_stored_at_fp32_on_request(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 4)  # --fp32-encoders
    conn = connect(db_path)
    rows = {row["part"]: row for row in read_query_encoders(conn)}
    conn.close()
    assert rows["text"]["precision"] == rows["image"]["precision"] == "fp32"
