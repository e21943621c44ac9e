"""The fetcher's safety features, each checked by what the local loc.gov stand-in saw:
the byte cap (refused or abandoned mid-body, a load-error row, the load goes on), the
--rate image limiter as the CLI wires it, the Retry-After pause, and the limiter's lock."""

from __future__ import annotations

import csv
import email.utils
import threading
import time

import pytest

from conftest import open_db
from loaders import fetch
from loaders.fetch import Fetcher, FetchError, RateLimited, RateLimiter, per_minute, retry_after_seconds

CAP = 1 << 20  # 1 MiB in these tests; the stand-in's oversized images are 32 MiB
OVERSIZED = ("huge", "chunked", "close")  # with Content-Length, chunked, until the connection closes


def image_url(server, kind: str, n: int) -> str:
    return f"{server.url}/iiif/service:gmd:test:{kind}:{n:04d}_001/full/!512,512/0/default.jpg"


def service_of(url: str) -> str:
    return url.split("/full/")[0]


def write_file_list(path, urls):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_url", "resource_url", "segment_num", "p1_item_id", "file_count"])
        for n, url in enumerate(urls, start=1):
            url = url.replace("/full/!512,512/", "/full/pct:100/")
            writer.writerow([url, f"r{n}", "0", f"http://www.loc.gov/item/testmap{n:04d}/", "1"])
    return path


def image_times(server) -> list[float]:
    return sorted(t for t, path in server.log if path.startswith("/iiif/"))


# -- the byte cap ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", OVERSIZED)
def test_oversized_body_is_refused_and_abandoned(loc_server, kind):
    server = loc_server()
    url = image_url(server, kind, 1)
    fetcher = Fetcher(RateLimiter([]), max_bytes=CAP, backoff=0)
    started = time.monotonic()
    with pytest.raises(FetchError, match=f"exceeds the {CAP} byte cap"):
        fetcher.get_bytes(url)
    streamed = server.wait_streamed(service_of(url))
    # Abandoned, not read to the end and then measured: the server could not send it all.
    assert not streamed["complete"] and streamed["sent"] < server.big_bytes
    assert server.hits[service_of(url)] == 1  # too big is final, not retried
    assert time.monotonic() - started < 5
    fetcher.close()


def test_cap_is_inclusive_and_covers_json(loc_server):
    from loc_server import map_image

    server = loc_server()
    url = image_url(server, "ok", 2)
    size = len(map_image(service_of(url)))
    assert len(Fetcher(RateLimiter([]), max_bytes=size).get_bytes(url)) == size
    with pytest.raises(FetchError, match="byte cap"):
        Fetcher(RateLimiter([]), max_bytes=size - 1).get_bytes(url)
    page = f"{server.url}/collections/test-maps/?fo=json"
    assert Fetcher(RateLimiter([])).get_json(page)["results"]
    with pytest.raises(FetchError, match="byte cap"):
        Fetcher(RateLimiter([]), max_bytes=100).get_json(page)


def test_load_csv_records_oversized_images_as_errors_and_goes_on(tmp_path, invoke, model_args, loc_server,
                                                                monkeypatch):
    monkeypatch.setattr(fetch, "MAX_BYTES", CAP)  # the default cap of the CLI's fetcher
    server = loc_server()
    big = [image_url(server, kind, n) for n, kind in enumerate(OVERSIZED, start=1)]
    good = [image_url(server, "ok", n) for n in (4, 5)]
    file_list = write_file_list(tmp_path / "files.csv", [big[0], good[0], big[1], big[2], good[1]])
    out = invoke(["load", "csv", tmp_path / "m.db", file_list, "--rate", "0", "--workers", "2", *model_args])
    assert "2 loaded" in out.output and "3 failed" in out.output
    db = open_db(tmp_path / "m.db")
    reasons = {r["source_id"].split("/full/")[0]: r["reason"] for r in db.execute("SELECT * FROM load_errors")}
    assert set(reasons) == {service_of(u) for u in big}
    assert all(f"exceeds the {CAP} byte cap" in reason for reason in reasons.values()), reasons
    assert db.execute("SELECT count(*) FROM maps").fetchone()[0] == 2
    for url in big:
        assert not server.wait_streamed(service_of(url))["complete"]


# -- --rate as the CLI wires it ----------------------------------------------------------------

class FastTime:
    """``loaders.fetch``'s clock running 60 times faster: a per-minute limit acts per second."""

    speedup = 60.0

    def monotonic(self):
        return time.monotonic() * self.speedup

    def sleep(self, seconds):
        time.sleep(seconds / self.speedup)

    def time(self):
        return time.time()


@pytest.mark.parametrize("source", ["csv", "loc"])
def test_rate_option_throttles_image_requests(tmp_path, invoke, model_args, loc_server, monkeypatch, source):
    monkeypatch.setattr(fetch, "time", FastTime())
    rate, count = 3, 6  # 3 a minute, i.e. 3 a second here: 6 images need at least a second
    server = loc_server(items=count, per_page=4)
    if source == "csv":
        file_list = write_file_list(tmp_path / "files.csv", [image_url(server, "ok", n) for n in range(1, count + 1)])
        args = ["load", "csv", tmp_path / "m.db", file_list]
    else:
        args = ["load", "loc", tmp_path / "m.db", f"{server.url}/collections/test-maps/"]
    out = invoke([*args, "--rate", str(rate), "--workers", "4", *model_args])
    assert f"{count} loaded" in out.output
    stamps = image_times(server)
    assert len(stamps) == count
    # No window of one (fast) minute holds more than `rate` image requests.
    gaps = [stamps[i + rate] - stamps[i] for i in range(count - rate)]
    assert min(gaps) >= 1.0 - 0.1, f"image requests at {[round(t - stamps[0], 3) for t in stamps]}"


def test_fractional_and_zero_rates():
    assert per_minute(200).rules == [(200, 60.0)]
    assert per_minute(0.5).rules == [(1, 120.0)]  # one every two minutes, not int(0.5) = unlimited
    count, seconds = per_minute(150.5).rules[0]
    assert count == 150 and seconds == pytest.approx(60 * 150 / 150.5)
    assert per_minute(0).rules == [] and per_minute(None).rules == []
    assert per_minute(60, burst=(10, 10.0)).rules == [(10, 10.0), (60, 60.0)]
    with pytest.raises(ValueError):
        per_minute(-1)


# -- Retry-After -------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_pauses_before_the_retry(loc_server, status):
    server = loc_server()
    url = image_url(server, "ok", 1)
    server.retry_after[service_of(url)] = "1"
    server.retry_status[service_of(url)] = status
    fetcher = Fetcher(RateLimiter([]), backoff=0)  # no backoff: only Retry-After can make it wait
    assert fetcher.get_bytes(url)[:2] == b"\xff\xd8"
    first, second = image_times(server)
    assert second - first >= 0.9, f"retried {second - first:.3f} s after HTTP {status} with Retry-After: 1"
    assert second - first < 3


def test_retry_after_values():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None
    assert retry_after_seconds("soon") is None  # unreadable: not a crash of the worker thread
    assert retry_after_seconds(email.utils.formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30, abs=2)
    naive = email.utils.formatdate(time.time() + 30).replace("+0000", "-0000")
    assert retry_after_seconds(naive) == pytest.approx(30, abs=2)


def test_unreadable_or_long_retry_after(loc_server):
    server = loc_server()
    url = image_url(server, "ok", 1)
    server.retry_after[service_of(url)] = "soon"
    with pytest.raises(RateLimited, match="without Retry-After"):
        Fetcher(RateLimiter([]), backoff=0).get_bytes(url)
    url = image_url(server, "ok", 2)
    server.retry_after[service_of(url)] = "3600"
    server.retry_status[service_of(url)] = 503
    with pytest.raises(FetchError, match="HTTP 503 .*Retry-After 3600 s"):
        Fetcher(RateLimiter([]), backoff=0).get_bytes(url)
    assert server.hits[service_of(url)] == 1  # not an hour of sleeping, and not hammered either


# -- the limiter under threads -----------------------------------------------------------------

class Instant(float):
    """A clock reading that hands the CPU to other threads whenever the limiter subtracts from
    it, i.e. between its check of the window and its booking of the request: preemption at the
    worst moment, every time, so a limiter without its lock lets two threads through at once."""

    def __sub__(self, other):
        time.sleep(2e-4)
        return float(self) - other


def test_rate_limiter_spaces_grants_across_threads():
    rate, threads, each = 100.0, 6, 8
    local = threading.local()

    def clock():  # remembers, per thread, the reading its grant was made at
        local.now = Instant(time.monotonic())
        return local.now

    limiter = RateLimiter([(1, 1 / rate)], clock=clock)
    granted, failures = [], []
    start = threading.Barrier(threads)

    def worker():
        try:
            start.wait()
            for _ in range(each):
                limiter.wait()
                granted.append(float(local.now))
        except Exception as error:  # noqa: BLE001 - a race can corrupt the window
            failures.append(error)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    assert not failures
    assert len(granted) == threads * each
    granted.sort()
    gaps = [b - a for a, b in zip(granted, granted[1:])]
    assert min(gaps) >= 1 / rate - 1e-3, f"{sum(g < 1 / rate - 1e-3 for g in gaps)} grants closer than 1/rate"
    # and the window held the pace: 48 grants at 100 a second span at least 0.47 s
    assert granted[-1] - granted[0] >= (threads * each - 1) / rate - 1e-3


# -- loc.gov's limits with our margin, as a server that counts arrivals sees them ---------------

class TenTimesFaster(FastTime):
    """loc.gov's 10 requests per 10 s act as 10 per second of real time."""

    speedup = 10.0


def test_loc_metadata_stays_under_a_limit_counted_on_jittered_arrivals(tmp_path, invoke, loc_server, monkeypatch):
    """Issue 18 (7): 60 items at the item endpoint against a stand-in that enforces 10 per 10 s on
    arrival times, which jitter; the limiter books by its own send times.  Bursting the window's
    whole allowance sent the 11th request exactly one window after the 1st, so any jitter made 11."""
    from test_loc_metadata_bulk import stored_items

    monkeypatch.setattr(fetch, "time", TenTimesFaster())
    server = loc_server(items=6)
    server.limit = (10, 1.0)  # ITEM_LIMITS' 10 / 10 s on the faster clock
    server.jitter = 0.02
    db = stored_items(tmp_path / "m.db", range(1, 61))
    out = invoke(["loc-metadata", db, "--api", server.url, "--method", "item", "--quiet"]).output
    assert server.too_many == 0, f"{server.too_many} requests answered 429 of {len(server.requests)} sent"
    assert "60 of 60 items filled" in out, out
    assert len(server.item_requests()) == 60


def test_limiter_spaces_requests_evenly_with_a_margin_on_the_published_limits():
    clock = {"now": 0.0}

    def sleep(seconds):
        clock["now"] += seconds

    published = [(10, 10.0), (200, 60.0)]  # loc.gov's item endpoint
    limiter = RateLimiter(published, clock=lambda: clock["now"], sleep=sleep)
    assert limiter.rules == published  # the published limits stay as given; the margin is ours
    assert fetch.request_interval(published) == pytest.approx(10.0 * (1 + fetch.SAFETY_MARGIN) / 10)
    stamps = []
    for _ in range(25):
        limiter.wait()
        stamps.append(clock["now"])
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert gaps == pytest.approx([1.1] * 24)  # one every 1.1 s: no burst of ten, then a wait
    # no window of the published 10 s plus our margin holds more than the published 10
    assert all(stamps[i + 10] - stamps[i] >= 11.0 - 1e-9 for i in range(len(stamps) - 10))

    # the cluster-wide limiter's bookings (``reserve``) keep the same pace, ahead of the clock
    clock["now"] = 1000.0
    ahead = RateLimiter([(20, 10.0), (80, 60.0)], clock=lambda: clock["now"], sleep=sleep)
    assert [ahead.reserve() for _ in range(4)] == pytest.approx([0, 0.825, 1.65, 2.475])  # the 80 / minute rule
    ahead.pause(30.0)  # a Retry-After holds the next booking, which then keeps the pace after it
    assert ahead.reserve() == pytest.approx(30.0)
    assert ahead.reserve() == pytest.approx(30.825)


def test_requests_name_the_tool_and_its_version(loc_server):
    from importlib.metadata import version

    from loaders.fetch import Fetcher

    server = loc_server(items=1)
    Fetcher().get_json(f"{server.url}/collections/test-maps/?fo=json")
    assert server.user_agents == {f"datasette-mapclip/{version('datasette-mapclip')} (map collection loader; httpx)"}
