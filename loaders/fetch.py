"""Fetch image bytes: local files, or HTTP with a shared rate limiter, retries and a size cap."""

from __future__ import annotations

import datetime
import email.utils
import json
import threading
import time
from collections import deque
from pathlib import Path

import httpx

USER_AGENT = "datasette-mapclip (+https://github.com/datasette-mapclip)"
MAX_BYTES = 64 * 1024 * 1024


class FetchError(Exception):
    """One image could not be fetched; becomes a load-error row."""


class RateLimited(Exception):
    """The server said stop (HTTP 429) for longer than we are willing to wait: end the load."""


class RateLimiter:
    """Sliding-window limits shared by every worker thread, e.g. ``[(10, 10.0), (200, 60.0)]``.

    loc.gov blocks a client for 5 minutes (burst) or an hour (crawl) once it exceeds
    these, so every request of a load waits its turn here.
    """

    def __init__(self, rules, clock=None, sleep=None):
        self.rules = [(int(count), float(seconds)) for count, seconds in rules if count]
        self.clock = clock or time.monotonic  # looked up now, not at import: tests can run time faster
        self.sleep = sleep or time.sleep
        self.sent = deque()
        self.lock = threading.Lock()
        self.paused_until = 0.0

    def pause(self, seconds: float):
        """Hold every worker (after a Retry-After)."""
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)

    def reserve(self) -> float:
        """Book the next request slot without sleeping; returns the seconds until it.

        What ``wait`` does with a virtual clock, for a limiter that lives in another process
        (the Ray engine's cluster-wide limiter, ``loaders.ray_engine``): slots are handed out
        in order, never earlier than one already booked, so callers sleep on their side and
        the limiter never blocks."""
        with self.lock:
            now = self.clock()
            slot = max(now, self.paused_until, self.sent[-1] if self.sent else now)
            horizon = max((seconds for _, seconds in self.rules), default=0)
            while self.sent and self.sent[0] <= now - horizon:
                self.sent.popleft()
            moved = True
            while moved:
                moved = False
                for count, seconds in self.rules:
                    recent = [t for t in self.sent if t > slot - seconds]
                    if len(recent) >= count and recent[-count] + seconds > slot:
                        slot, moved = recent[-count] + seconds, True
            self.sent.append(slot)
            return slot - now

    def wait(self):
        while True:
            with self.lock:
                now = self.clock()
                delay = self.paused_until - now
                if delay <= 0:
                    horizon = max((seconds for _, seconds in self.rules), default=0)
                    while self.sent and self.sent[0] <= now - horizon:
                        self.sent.popleft()
                    for count, seconds in self.rules:
                        recent = [t for t in self.sent if t > now - seconds]
                        if len(recent) >= count:
                            delay = max(delay, recent[-count] + seconds - now)
                    if delay <= 0:
                        self.sent.append(now)
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
        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise FetchError(f"response of {int(declared)} bytes (Content-Length) exceeds the "
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
