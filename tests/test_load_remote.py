"""load loc, load csv, import-beto and loc-metadata against the local loc.gov stand-in."""

import csv
import json
import threading

import numpy as np
import pytest
import torch

from conftest import open_db
from datasette_mapclip.model import iiif
from datasette_mapclip.store import MapStore
from loaders.fetch import Fetcher, FetchError, RateLimiter
from loaders.sources.loc import catalogue_fields, search_url


def test_iiif_urls_are_resized_and_canonical():
    url = "https://tile.loc.gov/image-services/iiif/service:gmd:gmd380:g3804:g3804o:pm010990/full/pct:25/0/default.jpg#h=1912&w=1612"
    assert iiif.sized(url) == (
        "https://tile.loc.gov/image-services/iiif/service:gmd:gmd380:g3804:g3804o:pm010990/full/!512,512/0/default.jpg"
    )
    assert iiif.canonical(url).endswith("pm010990/full/pct:100/0/default.jpg")
    assert iiif.sized("https://example.org/a.gif#h=1&w=2") == "https://example.org/a.gif"
    assert search_url("https://www.loc.gov/collections/sanborn-maps/?fa=location:arkansas").endswith(
        "?fa=location:arkansas&fo=json&c=100"
    )


def test_catalogue_fields_from_real_search_and_item_shapes():
    from loc_server import fixture

    result = fixture("search_results_sanborn_maps.json")["results"][0]
    fields = catalogue_fields(result)
    assert fields["title"] == "Sanborn Fire Insurance Map from Arkadelphia, Clark County, Arkansas."
    assert (fields["date"], fields["year"]) == ("1886-06", 1886)
    assert fields["place"] == "arkansas, arkadelphia, clark county"
    assert fields["format"] == "map"
    assert fields["notes"] == "Jun 1886. 2."
    item = catalogue_fields(fixture("item_2007680728_item_attribute.json")["item"])
    assert item["year"] == 1888 and "baseball cards" in item["subjects"]
    assert item["contributors"] == ["Allen & Ginter, sponsor"]
    assert item["format"] == "photo, print, drawing"


def test_load_loc_pages_expands_sheets_and_records_errors(tmp_path, invoke, model_args, loc_server):
    server = loc_server(items=6, per_page=4, sheets={2: 3}, bad={4: "missing", 5: "html"})
    out = invoke(["load", "loc", tmp_path / "m.db", f"{server.url}/collections/test-maps/?fa=location:arkansas",
                  "--rate", "0", *model_args])
    assert "6 loaded, 0 skipped (already stored), 2 failed" in out.output
    db = open_db(tmp_path / "m.db")
    rows = db.execute("SELECT * FROM maps ORDER BY item_id, sheet").fetchall()
    assert [(r["item_id"], r["sheet"]) for r in rows] == [
        ("testmap0001", 1), ("testmap0002", 1), ("testmap0002", 2), ("testmap0002", 3), ("testmap0003", 1),
        ("testmap0006", 1),
    ]
    first = rows[0]
    assert first["title"] == "Test map 1 of Arkadelphia, Clark County, Arkansas." and first["year"] == 1851
    assert first["place"] == "arkansas, arkadelphia, clark county" and first["format"] == "map"
    assert first["image_url"].endswith("/full/pct:100/0/default.jpg")
    assert first["thumbnail_url"].endswith("/full/!256,256/0/default.jpg")
    assert first["item_url"] == f"{server.url}/item/testmap0001/"
    errors = {r["source_id"].split("/")[-5]: r["reason"] for r in db.execute("SELECT * FROM load_errors")}
    assert errors["service:gmd:test:missing:0004_001"] == "HTTP 404 Not Found"
    assert errors["service:gmd:test:html:0005_001"] == "not an image: the server sent an HTML page"
    # the model got a derivative sized for it, never the full image
    image_requests = [p for p in server.requests if p.startswith("/iiif/")]
    assert image_requests and all("/full/!512,512/0/default.jpg" in p for p in image_requests)
    assert any("fo=json" in p and "sp=2" in p for p in server.requests)  # followed pagination.next
    assert sum("manifest.json" in p for p in server.requests) == 1  # only the multi-sheet item


def test_load_loc_limit_and_resume(tmp_path, invoke, model_args, loc_server):
    server = loc_server(items=6, per_page=4)
    url = f"{server.url}/collections/test-maps/"
    invoke(["load", "loc", tmp_path / "m.db", url, "--limit", "3", "--rate", "0", *model_args])
    assert open_db(tmp_path / "m.db").execute("SELECT count(*) FROM maps").fetchone()[0] == 3
    out = invoke(["load", "loc", tmp_path / "m.db", url, "--rate", "0", *model_args])
    assert "3 loaded, 3 skipped" in out.output
    assert open_db(tmp_path / "m.db").execute("SELECT count(DISTINCT source_id) FROM maps").fetchone()[0] == 6


def test_http_429_with_short_retry_after_waits_then_succeeds(loc_server):
    server = loc_server()
    service = server.service(1)
    server.retry_after[service] = "1"
    fetcher = Fetcher(RateLimiter([]), backoff=0)
    assert fetcher.get_bytes(f"{service}/full/!512,512/0/default.jpg")[:2] == b"\xff\xd8"
    assert server.hits[service] == 2
    first, second = (t for t, path in server.log if path.startswith("/iiif/"))
    assert second - first >= 0.9  # it waited the Retry-After (backoff is 0), not just retried


def test_http_429_with_long_retry_after_stops_the_load_with_advice(tmp_path, invoke, model_args, loc_server):
    server = loc_server(items=3, per_page=4)
    server.retry_after[server.service(2)] = "3600"
    out = invoke(["load", "loc", tmp_path / "m.db", f"{server.url}/collections/test-maps/", "--rate", "0",
                  "--workers", "1", *model_args], expect=2)
    assert "HTTP 429 Too Many Requests with Retry-After 3600 s" in out.output
    assert "run the same command again" in out.output
    assert "stopped:" in out.output


def test_server_errors_are_retried(loc_server):
    server = loc_server()
    fetcher = Fetcher(RateLimiter([]), backoff=0)
    flaky = f"{server.url}/iiif/service:gmd:test:flaky:0009_001"
    assert fetcher.get_bytes(f"{flaky}/full/!512,512/0/default.jpg")[:2] == b"\xff\xd8"
    assert server.hits[flaky] == 2
    with pytest.raises(FetchError, match="ConnectError|after 2 tries"):
        Fetcher(RateLimiter([]), retries=1, backoff=0, timeout=2).get_bytes("http://127.0.0.1:9/nothing.jpg")


def test_rate_limiter_holds_every_thread_to_the_window():
    clock = {"now": 0.0}
    sleeps = []
    lock = threading.Lock()

    def sleep(seconds):
        with lock:
            sleeps.append(seconds)
            clock["now"] += seconds

    limiter = RateLimiter([(3, 10.0), (5, 60.0)], clock=lambda: clock["now"], sleep=sleep)
    stamps = []
    for _ in range(7):
        limiter.wait()
        stamps.append(clock["now"])
    # evenly spaced at the slower rule, 5 a minute, with our margin: one every 66 / 5 = 13.2 s
    assert stamps == pytest.approx([13.2 * i for i in range(7)])
    threads = [threading.Thread(target=limiter.wait) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limiter.last >= 13.2 * 10 - 1e-9  # four more, each in its own slot, none at once
    for count, seconds in limiter.rules:  # no window of a rule's length holds more than its count
        assert all(stamps[i + count] - stamps[i] >= seconds for i in range(len(stamps) - count))


def write_file_list(path, server, rows_extra=()):
    rows = [
        (f"{server.service(1)}/full/pct:100/0/default.jpg", "r1", "0", "http://www.loc.gov/item/testmap0001/", "2"),
        (f"{server.service(1, 2)}/full/pct:100/0/default.jpg", "r1", "1", "http://www.loc.gov/item/testmap0001/", "2"),
        (f"{server.service(2)}/full/pct:100/0/default.jpg", "r2", "0", "http://www.loc.gov/item/testmap0002/", "1"),
        ("https://tile.loc.gov/storage-services/service/gmd/report.pdf", "r3", "0", "http://www.loc.gov/item/x/", "1"),
        *rows_extra,
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_url", "resource_url", "segment_num", "p1_item_id", "file_count"])
        writer.writerows(rows)
    return path


def test_load_csv_skips_pdfs_and_records_malformed_rows(tmp_path, invoke, model_args, loc_server):
    server = loc_server(bad={3: "truncated"})
    file_list = write_file_list(tmp_path / "merged_files.csv", server, rows_extra=[
        (f"{server.service(3)}/full/pct:100/0/default.jpg", "r4", "0", "http://www.loc.gov/item/testmap0003/", "1"),
        ("", "r5", "0", "http://www.loc.gov/item/testmap0005/", "1"),
        (f"{server.service(6)}/full/pct:100/0/default.jpg", "r6", "zero"),
    ])
    out = invoke(["load", "csv", tmp_path / "m.db", file_list, "--rate", "0", *model_args])
    assert "7 rows: 4 images, 1 PDF reports skipped, 2 malformed rows" in out.output
    assert "3 loaded" in out.output and "3 failed" in out.output
    db = open_db(tmp_path / "m.db")
    rows = [tuple(r) for r in db.execute("SELECT item_id, sheet, item_url FROM maps ORDER BY item_id, sheet")]
    assert rows == [("testmap0001", 1, "https://www.loc.gov/item/testmap0001/"),
                    ("testmap0001", 2, "https://www.loc.gov/item/testmap0001/"),
                    ("testmap0002", 1, "https://www.loc.gov/item/testmap0002/")]
    reasons = sorted(r[0] for r in db.execute("SELECT reason FROM load_errors"))
    assert any(r.startswith("line 7: no file_url") for r in reasons)
    assert any("line 8" in r and "segment_num 'zero' is not a number" in r and "fewer cells" in r for r in reasons)
    assert any("truncated" in r or "cannot decode" in r for r in reasons)


def test_csv_without_file_url_column_is_a_clear_error(tmp_path, invoke, model_args):
    (tmp_path / "list.csv").write_text("url,title\nhttp://x/a.jpg,A\n")
    out = invoke(["load", "csv", tmp_path / "m.db", tmp_path / "list.csv", *model_args], expect=1)
    assert "not a seed file list: no file_url column" in out.output


def test_import_beto_then_fill_metadata_from_the_item_endpoint(tmp_path, invoke, loc_server):
    server = loc_server()
    urls = [f"{server.service(n)}/full/pct:100/0/default.jpg" for n in (1, 2, 3)]
    matrix = torch.randn(3, 512) * 7  # the seed's vectors are not unit length
    torch.save(matrix, tmp_path / "beto.pt")
    torch.save(urls, tmp_path / "beto_idx.pt")
    file_list = write_file_list(tmp_path / "merged_files.csv", server)
    args = ["import-beto", tmp_path / "m.db", tmp_path / "beto.pt", tmp_path / "beto_idx.pt", "--files", file_list, "--quiet"]
    assert "imported 3 vectors" in invoke(args).output
    assert "imported 0 vectors, 3 already stored" in invoke(args).output
    store = MapStore(tmp_path / "m.db")
    model = store.model()
    assert (model["name"], model["architecture"], model["pretrained"], model["dim"]) == ("ViT-B-32/openai", "ViT-B-32", "openai", 512)
    ids, stored = store.vectors()
    expected = torch.nn.functional.normalize(matrix, dim=-1).numpy()
    order = [r[0] for r in store.conn.execute("SELECT source_id FROM maps ORDER BY id")]
    np.testing.assert_allclose(stored, expected[[urls.index(u) for u in order]], atol=1e-6)
    items = [r[0] for r in store.conn.execute("SELECT item_id FROM maps ORDER BY id")]
    assert items == ["testmap0001", "testmap0002", None]

    out = invoke(["loc-metadata", tmp_path / "m.db", "--api", server.url, "--quiet"])
    assert "2 of 2 items filled, 0 failed" in out.output
    row = store.conn.execute("SELECT * FROM maps WHERE item_id = 'testmap0002'").fetchone()
    assert (row["title"], row["year"], row["place"]) == ("Catalogued map 2", 1902, "arkansas, little rock")
    assert json.loads(row["subjects"]) == ["fire insurance maps", "arkansas"]
    assert "0 of 0 items filled" in invoke(["loc-metadata", tmp_path / "m.db", "--api", server.url, "--quiet"]).output


def test_import_beto_refuses_pickles_that_are_not_plain_data(tmp_path, invoke):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this would run code",))

    (tmp_path / "beto.pt").write_bytes(pickle.dumps(Payload()))
    torch.save(["https://x/iiif/a/full/pct:100/0/default.jpg"], tmp_path / "idx.pt")
    out = invoke(["import-beto", tmp_path / "m.db", tmp_path / "beto.pt", tmp_path / "idx.pt"], expect=1)
    assert "cannot read" in out.output or "refusing to load" in out.output
    assert "this would run code" not in out.output
    torch.save(torch.randn(2, 8), tmp_path / "two.pt")
    out = invoke(["import-beto", tmp_path / "m.db", tmp_path / "two.pt", tmp_path / "idx.pt"], expect=1)
    assert "has 2 rows but" in out.output
