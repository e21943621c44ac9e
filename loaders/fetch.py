"""Fetch image bytes: local files, or HTTP with a shared rate limiter, retries and a size cap."""

from __future__ import annotations

import datetime
import email.utils
import importlib.metadata
import json
import threading
import time
from pathlib import Path

import httpx

from datasette_mapclip.store.ids import declared_length


def _version() -> str:
    try:
        return importlib.metadata.version("datasette-mapclip")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


# Names the tool and its version (the project has no public home page to link to yet).
USER_AGENT = f"datasette-mapclip/{_version()} (map collection loader; httpx)"
MAX_BYTES = 64 * 1024 * 1024


class FetchError(Exception):
    """One image could not be fetched; becomes a load-error row."""


class RateLimited(Exception):
    """The server said stop (HTTP 429) for longer than we are willing to wait: end the load."""


# Our margin on top of a server's published limits (the limits themselves stay the server's, e.g.
# ``loaders.sources.loc.ITEM_LIMITS``).  We count requests when we send them; the server counts them
# when they arrive, after network and scheduling delays that vary from one request to the next.  So
# every limit is booked against a window this much longer than the published one: 10 requests per
# 10 s are sent one per 1.1 s, and a request may arrive up to a second later than its neighbours
# before the server could count 11 in its 10 s.  loc.gov blocks a client for 5 minutes or an hour
# once it passes a limit; a few percent of speed is cheap against that.
SAFETY_MARGIN = 0.1


def request_interval(rules, margin: float = SAFETY_MARGIN) -> float:
    """Seconds between two requests under ``rules`` (published ``(count, seconds)`` limits) with
    our ``margin``: the slowest rule's pace, its window stretched by the margin.
    ``[(10, 10.0), (200, 60.0)]`` -> 1.1 s; ``[(20, 10.0), (80, 60.0)]`` -> 0.825 s."""
    return max((float(seconds) * (1 + margin) / int(count) for count, seconds in rules if count), default=0.0)


def requests_per_minute(rules, margin: float = SAFETY_MARGIN) -> float:
    """The sustained rate ``rules`` are booked at (for help texts and estimates); 0 for no limit."""
    interval = request_interval(rules, margin)
    return 60.0 / interval if interval else 0.0


class RateLimiter:
    """A server's published limits, shared by every worker thread, e.g. ``[(10, 10.0), (200, 60.0)]``
    (``rules``: at most 10 requests in any 10 s and 200 in any minute).

    Requests are spaced evenly, one every ``interval`` seconds (``request_interval``: the slowest
    rule's pace with our ``SAFETY_MARGIN``), instead of sending a window's whole allowance at once
    and then waiting out the window.  Evenly spaced requests keep every rule (no window of a rule's
    length holds more than its count) with room for jitter in when they arrive, where bursts at the
    edges of the window put the server's count over the limit as soon as one request of a burst
    arrives late (HTTP 429; loc.gov then blocks the client for 5 minutes or an hour).
    """

    def __init__(self, rules, clock=None, sleep=None, margin: float = SAFETY_MARGIN):
        self.margin = margin
        self.rules = rules
        self.clock = clock or time.monotonic  # looked up now, not at import: tests can run time faster
        self.sleep = sleep or time.sleep
        self.last: float | None = None  # the latest slot booked
        self.lock = threading.Lock()
        self.paused_until = 0.0

    @property
    def rules(self) -> list[tuple[int, float]]:
        """The published limits; setting them (a new ``--rate``) sets the pace."""
        return self._rules

    @rules.setter
    def rules(self, rules):
        self._rules = [(int(count), float(seconds)) for count, seconds in rules if count]
        self.interval = request_interval(self._rules, self.margin)

    def pause(self, seconds: float):
        """Hold every worker (after a Retry-After)."""
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)

    def _earliest(self, now: float) -> float:
        """The first moment the next request may go (call with the lock held)."""
        slot = max(now, self.paused_until)
        if self.last is not None:
            slot = max(slot, self.last + self.interval)
        return slot

    def reserve(self) -> float:
        """Book the next request slot without sleeping; returns the seconds until it.

        What ``wait`` does with a virtual clock, for a limiter that lives in another process
        (the Ray engine's cluster-wide limiter, ``loaders.ray_engine``): slots are handed out
        in order, one ``interval`` apart, so callers sleep on their side and the limiter never
        blocks."""
        with self.lock:
            now = self.clock()
            self.last = slot = self._earliest(now)
            return slot - now

    def wait(self):
        """Sleep until this thread's request may go, and book it."""
        while True:
            with self.lock:
                now = self.clock()
                delay = self._earliest(now) - now
                if delay <= 0:
                    self.last = now
                    return
            self.sleep(delay)


def per_minute_rule(requests_per_minute: float | None) -> tuple[int, float] | None:
    """``(count, seconds)`` for a rate in requests per minute; None for no limit (0 or None).

    Fractional rates keep their meaning: 0.5 is one request per 120 s, 150.5 is 150 per 59.8 s
    (``int()`` of them would give 0, i.e. unlimited, or a faster rate)."""
    if not requests_per_minute:
        return None
    if requests_per_minute < 0:
        raise ValueError(f"a rate cannot be negative: {requests_per_minute}")
    count = max(1, int(requests_per_minute))
    return count, 60.0 * count / requests_per_minute


def per_minute(requests_per_minute: float | None, burst: tuple[int, float] | None = None) -> RateLimiter:
    rules = []
    if burst:
        rules.append(burst)
    rule = per_minute_rule(requests_per_minute)
    if rule:
        rules.append(rule)
    return RateLimiter(rules)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):  # Python 3.10+ raises on a malformed date
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:  # "-0000" parses as naive; HTTP dates are GMT
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, parsed.timestamp() - time.time())


class Fetcher:
    """Thread-safe: one ``httpx.Client`` and one limiter shared by all workers.

    Bodies are streamed and abandoned as soon as they pass ``max_bytes`` (default
    ``MAX_BYTES``): a declared Content-Length over the cap is refused before reading, and a
    body without one (chunked, or read until close) is cut off at the cap, never held whole."""

    def __init__(self, limiter: RateLimiter | None = None, *, timeout: float = 30.0, retries: int = 3,
                 max_retry_after: float = 120.0, max_bytes: int | None = None, backoff: float = 1.0):
        self.limiter = limiter or RateLimiter([])
        self.retries = retries
        self.max_retry_after = max_retry_after
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.backoff = backoff
        self.client = httpx.Client(timeout=timeout, follow_redirects=True, headers={"User-Agent": USER_AGENT})

    def close(self):
        self.client.close()

    def _read_capped(self, response: httpx.Response) -> bytes:
        declared = declared_length(response.headers.get("Content-Length", ""))
        if declared is not None and declared > self.max_bytes:
            raise FetchError(f"response of {declared} bytes (Content-Length) exceeds the "
                             f"{self.max_bytes} byte cap")
        chunks, size = [], 0
        for chunk in response.iter_bytes():  # decoded: a small gzip body cannot expand past the cap
            size += len(chunk)
            if size > self.max_bytes:
                raise FetchError(f"response exceeds the {self.max_bytes} byte cap (stopped reading at {size} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _pause_for(self, url: str, response: httpx.Response) -> float | None:
        """Seconds every worker waits after a 429, or a 5xx with a usable Retry-After; None: no pause."""
        wait = retry_after_seconds(response.headers.get("Retry-After"))
        too_long = wait is not None and wait > self.max_retry_after
        if response.status_code == 429 and (wait is None or too_long):
            raise RateLimited(
                f"{url} answered HTTP 429 Too Many Requests"
                + (f" with Retry-After {wait:.0f} s" if wait is not None else " without Retry-After")
                + ". The server is limiting this client: wait (loc.gov blocks for up to an hour), "
                "then run the same command again; it resumes where it stopped. "
                "Lower --rate to stay under the limit."
            )
        if too_long:
            raise FetchError(f"HTTP {response.status_code} {response.reason_phrase} with Retry-After {wait:.0f} s")
        return wait

    # A limiter that keys its limits by host (the Ray engine's cluster-wide one) is told the URL:
    # it defines ``wait_for(url)`` and ``pause_for(url, seconds)``; a plain RateLimiter is not.
    def _wait_turn(self, url: str):
        wait_for = getattr(self.limiter, "wait_for", None)
        if wait_for is not None:
            wait_for(url)
        else:
            self.limiter.wait()

    def _pause_all(self, url: str, seconds: float):
        pause_for = getattr(self.limiter, "pause_for", None)
        if pause_for is not None:
            pause_for(url, seconds)
        else:
            self.limiter.pause(seconds)

    def fetch(self, url: str) -> tuple[httpx.Response, bytes]:
        """(response, body) with the limiter, retries on network errors and 5xx, 429 and
        Retry-After handling, and the byte cap; the response's own body is already closed."""
        last_error = None
        for attempt in range(self.retries + 1):
            self._wait_turn(url)
            try:
                with self.client.stream("GET", url) as response:
                    status = response.status_code
                    if status == 429 or status >= 500:
                        wait = self._pause_for(url, response)
                        if wait is not None:  # every worker holds off, then this one retries
                            self._pause_all(url, wait)
                            last_error = f"HTTP {status}, waited {wait:.0f} s"
                            continue
                        last_error = f"HTTP {status} {response.reason_phrase}"
                    elif status >= 400:
                        raise FetchError(f"HTTP {status} {response.reason_phrase}")
                    else:
                        return response, self._read_capped(response)
            except httpx.TimeoutException:
                last_error = f"timed out after {self.client.timeout.read:.0f} s"
            except httpx.HTTPError as error:
                last_error = f"{type(error).__name__}: {error}"
            if attempt < self.retries:
                time.sleep(self.backoff * (2**attempt))
        raise FetchError(f"{last_error} (after {self.retries + 1} tries)")

    def get(self, url: str) -> httpx.Response:
        """GET as ``fetch`` does, as a read ``httpx.Response`` (decoded body, status, headers)."""
        response, body = self.fetch(url)
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx.Response(response.status_code, headers=headers, content=body, request=response.request)

    def get_json(self, url: str):
        response, body = self.fetch(url)
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError(f"{url} did not return JSON (content-type {response.headers.get('content-type')})")

    def get_bytes(self, location: str) -> bytes:
        if not location.startswith(("http://", "https://")):
            return read_file(location)
        return self.fetch(location)[1]


def read_file(path: str, max_bytes: int = 1 << 30) -> bytes:
    try:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise FetchError(f"file of {size} bytes exceeds the {max_bytes} byte cap")
        return Path(path).read_bytes()
    except OSError as error:
        raise FetchError(f"cannot read file: {error.strerror or error}")
