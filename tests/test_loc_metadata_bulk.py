"""`mapclip loc-metadata` in bulk: catalogue fields from search pages (150 items a request),
partitioned by date ranges under loc.gov's result cap, resumable page by page, with the item
endpoint only for what no page returned.  All against the local loc.gov stand-in."""

import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from click.testing import CliRunner

from conftest import open_db
from datasette_mapclip.cli import cli
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.records import MapRecord
from loaders import fetch
from loaders.fetch import Fetcher, RateLimiter
from loaders.sources.loc_catalogue import base_search, derive_search, fill_catalogue, halves, page_url, parse_dates

REPO = Path(__file__).resolve().parent.parent


def stored_items(path, numbers) -> Path:
    """A database whose maps have item ids and no catalogue fields (as `import-beto` leaves them)."""
    store = MapStore(path)
    records = [MapRecord(source_id=f"https://tile.example/iiif/m{n}/full/pct:100/0/default.jpg",
                         location=f"https://tile.example/iiif/m{n}/full/!512,512/0/default.jpg", source="beto",
                         item_id=f"testmap{n:04d}", sheet=1) for n in numbers]
    with store.transaction():
        for record in records:
            store.upsert_map(record)
        store.upsert_items(records)
    store.close()
    return path


def query(path: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))


def item_number(path: str) -> int:
    return int(path.split("/")[2].replace("testmap", ""))


def unlimited(**kwargs) -> Fetcher:
    return Fetcher(RateLimiter([]), backoff=0, **kwargs)


def titles(db_path) -> dict[int, str]:
    return {int(row[0].replace("testmap", "")): row[1]
            for row in open_db(db_path).execute("SELECT item_id, title FROM maps")}


class FastClock:
    """``loaders.fetch``'s clock and sleep ten times faster: the limiter keeps loc.gov's pace in
    requests per (fast) second, and a crawl's logic is checked in a tenth of the time."""

    def monotonic(self):
        return time.monotonic() * 10

    def sleep(self, seconds):
        time.sleep(seconds / 10)

    def time(self):
        return time.time()


def test_partitioned_crawl_fills_a_collection_in_few_requests(tmp_path, invoke, loc_server, monkeypatch):
    monkeypatch.setattr(fetch, "time", FastClock())
    server = loc_server(items=460)
    # Issue 18 (12c): a crawl gone wrong (asking the item endpoint for every item, or partitioning
    # without end) pages on at the limiter's pace for minutes.  This one needs 15 requests: past
    # 20 the stand-in answers 429 without Retry-After, which stops the run at once.
    server.budget = 20
    server.result_cap = 200  # loc.gov's is 100,000: small here so the crawl must partition
    undated = {7, 177, 277, 377, 457}  # 7 is on the first page of the whole (unpartitioned) search
    server.years = {n: None if n in undated else 1800 + n % 150 for n in range(1, 461)}
    db = stored_items(tmp_path / "m.db", range(1, 461))

    result = CliRunner().invoke(cli, ["loc-metadata", str(db), "--api", server.url, "--result-cap", "200", "--quiet"])
    assert server.over_budget == 0, f"more than {server.budget} requests: {len(server.requests)} and counting"
    out = result.output
    assert result.exit_code == 0 and "460 of 460 items filled, 0 failed, 0 missing" in out, out
    pages, items = server.page_requests(), server.item_requests()
    partitions = open_db(db).execute("SELECT count(*) FROM loc_catalogue_partitions").fetchone()[0]
    assert len(pages) + len(items) <= 460 / 150 + partitions + len(undated), (len(pages), partitions, len(items))
    assert sorted(item_number(path) for path in items) == sorted(undated - {7})  # the fallback asked for nothing else
    assert partitions > 3 and len(set(pages)) == len(pages)  # split, and no page fetched twice
    for path in pages:  # whole pages of 150, small responses, never past the cap (the stand-in answers 400)
        q = query(path)
        assert path.startswith("/maps/") and (q["c"], q["at"]) == ("150", "results,pagination")
        assert (int(q["sp"]) - 1) * 150 < 200
    names = titles(db)
    assert names[8] == names[7].replace("7", "8") == "Search result map 8" and names[177] == "Catalogued map 177"
    row = open_db(db).execute("SELECT * FROM maps WHERE item_id = 'testmap0008'").fetchone()
    assert (row["year"], row["place"], row["format"]) == (1808, "arkansas, arkadelphia, clark county", "map")


def test_killed_crawl_resumes_without_fetching_a_page_twice(tmp_path, invoke, loc_server):
    server = loc_server(items=1000)  # 7 pages of 150
    server.hold_after = 3
    db = stored_items(tmp_path / "m.db", range(1, 1001))
    command = [sys.executable, "-m", "datasette_mapclip.cli", "loc-metadata", str(db), "--api", server.url,
               "--pages-in-flight", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.holding.wait(60), process.communicate(timeout=5)[0]
        process.kill()  # mid-crawl: three pages stored, the fourth asked for
        process.wait(10)
    finally:
        server.release.set()
    first_run = server.page_requests()
    assert [query(p)["sp"] for p in first_run] == ["1", "2", "3", "4"]
    stored = {row[0] for row in open_db(db).execute("SELECT page FROM loc_catalogue_pages")}
    assert stored == {1, 2, 3} and len(titles(db)) == 1000
    assert sum(title is not None for title in titles(db).values()) == 450

    server.hold_after = None
    out = invoke(["loc-metadata", db, "--api", server.url, "--quiet"]).output
    assert "550 of 550 items filled, 0 failed, 0 missing" in out, out
    second_run = server.page_requests()[len(first_run):]
    assert sorted(query(p)["sp"] for p in second_run) == ["4", "5", "6", "7"]
    assert not set(first_run[:3]) & set(second_run)  # no stored page fetched again
    assert all(title is not None for title in titles(db).values()) and not server.item_requests()
    assert "0 of 0 items filled" in invoke(["loc-metadata", db, "--api", server.url, "--quiet"]).output
    assert len(server.page_requests()) == len(first_run) + 4


def test_long_retry_after_stops_the_crawl_and_a_rerun_asks_only_for_that_page(tmp_path, invoke, loc_server):
    server = loc_server(items=400)  # 3 pages
    server.throttle["sp=2&"] = "3600"
    db = stored_items(tmp_path / "m.db", range(1, 401))
    out = invoke(["loc-metadata", db, "--api", server.url, "--quiet"], expect=1).output
    assert "HTTP 429 Too Many Requests with Retry-After 3600 s" in out and "run the same command again" in out
    assert "250 of 400 items filled" in out  # pages 1 and 3 (in flight beside page 2) were stored
    asked = len(server.page_requests())
    out = invoke(["loc-metadata", db, "--api", server.url, "--quiet"]).output
    assert "150 of 150 items filled, 0 failed, 0 missing" in out, out
    assert [query(p)["sp"] for p in server.page_requests()[asked:]] == ["2"]


def test_failed_page_is_recorded_and_its_items_come_from_the_item_endpoint(tmp_path, loc_server):
    server = loc_server(items=400)
    server.fail["sp=2&"] = 503
    server.gone = {200}  # on the failed page, and unknown to the item endpoint
    store = MapStore(stored_items(tmp_path / "m.db", range(1, 401)))
    summary = fill_catalogue(store, unlimited(retries=1), unlimited(), api=server.url, progress=False,
                             echo=lambda line: None)
    assert (summary.filled, summary.failed, summary.missing, summary.failed_pages) == (399, 0, 1, 1)
    assert summary.item_requests == 150  # exactly the failed page's items
    assert sorted(query(p)["sp"] for p in server.page_requests()) == ["1", "2", "2", "3"]  # one retry, went on
    errors = {row["source_id"]: row["reason"] for row in store.conn.execute("SELECT * FROM load_errors")}
    page_error = next(reason for key, reason in errors.items() if key.startswith("metadata-page:") and "sp=2&" in key)
    assert "search page failed: HTTP 503" in page_error
    assert errors["metadata:testmap0200"].startswith("loc.gov has no item testmap0200 (HTTP 404")
    assert titles(tmp_path / "m.db")[151] == "Catalogued map 151"
    assert titles(tmp_path / "m.db")[301] == "Search result map 301"  # the page after the failed one


def test_auto_asks_the_item_endpoint_when_the_search_is_far_larger_than_the_items(tmp_path, loc_server):
    server = loc_server(items=6)
    server.catalogue = list(range(1, 60_001))  # 400 pages for 100 items: 100 item requests are quicker
    store = MapStore(stored_items(tmp_path / "m.db", range(1001, 1101)))  # none on the first page
    lines = []
    summary = fill_catalogue(store, unlimited(), unlimited(), api=server.url, progress=False, echo=lines.append)
    assert (summary.filled, summary.search_requests, summary.item_requests) == (100, 1, 100)
    assert len(server.page_requests()) == 1 and len(server.item_requests()) == 100
    assert "asking the item endpoint" in lines[-1]


def test_bulk_only_notes_items_no_page_returned_and_a_search_under_the_cap_includes_undated(
        tmp_path, invoke, loc_server):
    server = loc_server(items=300)
    server.years = {n: None if n in (205, 206) else 1800 + n % 150 for n in range(1, 301)}
    over = stored_items(tmp_path / "over.db", range(1, 301))
    out = invoke(["loc-metadata", over, "--api", server.url, "--method", "bulk", "--result-cap", "200",
                  "--quiet"]).output
    assert "298 of 300 items filled, 0 failed, 2 missing" in out, out
    assert not server.item_requests()
    reasons = dict(open_db(over).execute("SELECT source_id, reason FROM load_errors").fetchall())
    assert set(reasons) == {"metadata:testmap0205", "metadata:testmap0206"}
    assert "not on any page of" in reasons["metadata:testmap0205"]

    under = stored_items(tmp_path / "under.db", range(1, 301))
    asked = len(server.page_requests())
    out = invoke(["loc-metadata", under, "--api", server.url, "--method", "bulk", "--quiet"]).output
    assert "300 of 300 items filled, 0 failed, 0 missing" in out, out
    assert len(server.page_requests()) - asked == 2 and "dates" not in server.page_requests()[-1]


def test_search_urls_partitions_and_bad_options():
    assert derive_search("https://www.loc.gov/", ["sanborn00192_001", "sanborn01234_002"]) == \
        "https://www.loc.gov/collections/sanborn-maps/"
    assert derive_search("https://www.loc.gov", ["sanborn00192_001", "2011633553"]) == "https://www.loc.gov/maps/"
    key, years = base_search("https://www.loc.gov/collections/sanborn-maps?fa=location:arkansas&dates=1800/1899"
                             "&fo=json&sp=4&c=25")
    assert (key, years) == ("https://www.loc.gov/collections/sanborn-maps/?fa=location:arkansas", (1800, 1899))
    assert page_url(key, "1850/1874", 3) == ("https://www.loc.gov/collections/sanborn-maps/?fa=location:arkansas"
                                             "&dates=1850/1874&fo=json&c=150&sp=3&at=results,pagination")
    assert halves("", (1000, 2025)) == ["1000/1512", "1513/2025"]
    assert halves("1850/1851", (1000, 2025)) == ["1850/1850", "1851/1851"] and halves("1850/1850", (0, 1)) is None
    for bad in ("1900", "1900/1800", "a/b"):
        try:
            parse_dates(bad)
        except ValueError as error:
            assert "is not a year range FROM/TO" in str(error)
        else:
            raise AssertionError(bad)


def test_help_says_how_the_crawl_is_partitioned_and_bad_dates_are_refused(tmp_path, invoke):
    help_text = " ".join(invoke(["loc-metadata", "--help"]).output.split())
    assert "does not page past 100,000 results" in help_text and "partitioned by date ranges" in help_text
    db = stored_items(tmp_path / "m.db", [1])
    out = invoke(["loc-metadata", db, "--dates", "1900-1950"], expect=2).output
    assert "is not a year range FROM/TO" in out
