"""Fetch image bytes: local files, or HTTP with a shared rate limiter, retries and a size cap."""

from __future__ import annotations

import email.utils
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

    def __init__(self, rules, clock=time.monotonic, sleep=time.sleep):
        self.rules = [(int(count), float(seconds)) for count, seconds in rules if count]
        self.clock = clock
        self.sleep = sleep
        self.sent = deque()
        self.lock = threading.Lock()
        self.paused_until = 0.0

    def pause(self, seconds: float):
        """Hold every worker (after a Retry-After)."""
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)

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


def per_minute(requests_per_minute: float | None, burst: tuple[int, float] | None = None) -> RateLimiter:
    rules = []
    if burst:
        rules.append(burst)
    if requests_per_minute:
        rules.append((int(requests_per_minute), 60.0))
    return RateLimiter(rules)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class Fetcher:
    """Thread-safe: one ``httpx.Client`` and one limiter shared by all workers."""

    def __init__(self, limiter: RateLimiter | None = None, *, timeout: float = 30.0, retries: int = 3,
                 max_retry_after: float = 120.0, max_bytes: int = MAX_BYTES, backoff: float = 1.0):
        self.limiter = limiter or RateLimiter([])
        self.retries = retries
        self.max_retry_after = max_retry_after
        self.max_bytes = max_bytes
        self.backoff = backoff
        self.client = httpx.Client(timeout=timeout, follow_redirects=True, headers={"User-Agent": USER_AGENT})

    def close(self):
        self.client.close()

    def get(self, url: str) -> httpx.Response:
        """GET with the limiter, retries on network errors and 5xx, and 429 handling."""
        last_error = None
        for attempt in range(self.retries + 1):
            self.limiter.wait()
            try:
                response = self.client.get(url)
            except httpx.TimeoutException:
                last_error = f"timed out after {self.client.timeout.read:.0f} s"
            except httpx.HTTPError as error:
                last_error = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 429:
                    wait = retry_after_seconds(response.headers.get("Retry-After"))
                    if wait is None or wait > self.max_retry_after:
                        raise RateLimited(
                            f"{url} answered HTTP 429 Too Many Requests"
                            + (f" with Retry-After {wait:.0f} s" if wait is not None else " without Retry-After")
                            + ". The server is limiting this client: wait (loc.gov blocks for up to an hour), "
                            "then run the same command again; it resumes where it stopped. "
                            "Lower --rate to stay under the limit."
                        )
                    self.limiter.pause(wait)
                    last_error = f"HTTP 429, waited {wait:.0f} s"
                    continue
                if response.status_code >= 500:
                    last_error = f"HTTP {response.status_code} {response.reason_phrase}"
                elif response.status_code >= 400:
                    raise FetchError(f"HTTP {response.status_code} {response.reason_phrase}")
                else:
                    return response
            if attempt < self.retries:
                time.sleep(self.backoff * (2**attempt))
        raise FetchError(f"{last_error} (after {self.retries + 1} tries)")

    def get_json(self, url: str):
        response = self.get(url)
        try:
            return response.json()
        except ValueError:
            raise FetchError(f"{url} did not return JSON (content-type {response.headers.get('content-type')})")

    def get_bytes(self, location: str) -> bytes:
        if not location.startswith(("http://", "https://")):
            return read_file(location)
        response = self.get(location)
        if len(response.content) > self.max_bytes:
            raise FetchError(f"response of {len(response.content)} bytes exceeds the {self.max_bytes} byte cap")
        return response.content


def read_file(path: str, max_bytes: int = 1 << 30) -> bytes:
    try:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise FetchError(f"file of {size} bytes exceeds the {max_bytes} byte cap")
        return Path(path).read_bytes()
    except OSError as error:
        raise FetchError(f"cannot read file: {error.strerror or error}")
