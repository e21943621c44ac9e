"""A local stand-in for loc.gov and tile.loc.gov, built on real loc.gov response shapes
kept in tests/fixtures/loc/ (search page, item, IIIF manifest).

Routes
  /collections/test-maps/?fo=json&sp=N   search pages (pagination.next chains them)
  /item/<id>/manifest.json               IIIF Presentation 2 manifest (multi-sheet items)
  /item/<id>/?fo=json                    item endpoint ({"item": {...}}); 404 for numbers in ``.gone``
  /maps/?fo=json&c=&sp=&dates=&at=       the catalogue search (loc.gov's maps format, also /search/):
                                         ``c`` up to 150 a page, ``dates=FROM/TO`` filters by year
                                         (undated items match no range), ``at=`` keeps only the named
                                         attributes, and no page starts past ``.result_cap`` results
                                         (HTTP 400, as loc.gov stops paging at 100,000)
  /iiif/<service>/full/<size>/0/default.jpg   IIIF image API; some services misbehave on purpose
  /iiif/<service>/info.json, /iiif/<service>/<x,y,w,h>/<w,>/0/default.jpg
                                         the same image as a level-1 tiled IIIF service (deep zoom),
                                         DEEP_ZOOM_SIZE pixels, 256 px tiles, CORS open like loc.gov's

``.log`` has (time.monotonic(), path) of every request as it arrived, for timing tests.
Oversized images (kinds 'huge', 'chunked', 'close') are a real JPEG padded to ``big_bytes``,
sent with a Content-Length, chunked without one, or until the connection closes (HTTP/1.0);
``.streamed[service]`` says how many bytes went out and whether the client read them all.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw

FIXTURES = Path(__file__).parent / "fixtures" / "loc"


def fixture(name: str) -> dict:
    data = json.loads((FIXTURES / name).read_text())
    data.pop("_source", None)
    return data


def map_image(seed: str, size=(300, 220)) -> bytes:
    """A small deterministic 'map': paper tone, coloured blocks and lines."""
    digest = hashlib.sha256(seed.encode()).digest()
    image = Image.new("RGB", size, (230, 220, 190))
    draw = ImageDraw.Draw(image)
    for i in range(0, 24, 3):
        x, y = digest[i] % size[0], digest[i + 1] % size[1]
        draw.rectangle([x, y, x + 40 + digest[i + 2] % 60, y + 30], fill=(digest[i], digest[i + 1], digest[i + 2]))
        draw.line([0, y, size[0], x % size[1]], fill=(40, 40, 120), width=2)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


DEEP_ZOOM_SIZE = (1200, 880)
TILE = 256


def deep_zoom_image(service: str) -> Image.Image:
    return Image.open(io.BytesIO(map_image(service, size=DEEP_ZOOM_SIZE))).convert("RGB")


def iiif_info(service: str) -> dict:
    width, height = DEEP_ZOOM_SIZE
    return {"@context": "http://iiif.io/api/image/2/context.json", "@id": service,
            "protocol": "http://iiif.io/api/image", "width": width, "height": height,
            "tiles": [{"width": TILE, "scaleFactors": [1, 2, 4, 8]}],
            "profile": ["http://iiif.io/api/image/2/level1.json", {"formats": ["jpg"], "qualities": ["default"]}]}


def iiif_tile(service: str, region: str, size: str) -> bytes | None:
    """A region of the deep-zoom image scaled to ``w,`` (or ``w,h``, or ``full``/``max``); None if malformed."""
    try:
        x, y, w, h = (int(v) for v in region.split(","))
        image = deep_zoom_image(service).crop((x, y, x + w, y + h))
        if size not in ("full", "max"):
            width, _, height = size.partition(",")
            width = int(width) if width else round(int(height) * w / h)
            height = int(height) if height else max(1, round(width * h / w))
            image = image.resize((width, height))
    except (ValueError, ZeroDivisionError):
        return None
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


class LocServer:
    """Start with ``LocServer().start()``; ``.url`` is its base; ``.requests`` logs every path."""

    def __init__(self, items=6, per_page=4, sheets: dict[int, int] | None = None, bad: dict[int, str] | None = None):
        self.items = items
        self.per_page = per_page
        self.sheets = sheets or {}  # item number -> sheet count
        self.bad = bad or {}  # item number -> 'missing' | 'html' | 'truncated' (its first image)
        self.requests: list[str] = []
        self.log: list[tuple[float, str]] = []  # (time.monotonic(), path) per request, in arrival order
        self.user_agents: set[str] = set()
        self.hits: dict[str, int] = {}
        self.retry_after: dict[str, str] = {}  # service -> Retry-After value for its first request
        self.retry_status: dict[str, int] = {}  # service -> status sent with that Retry-After (default 429)
        self.big_bytes = 32 << 20  # size of the 'huge', 'chunked' and 'close' images
        self.streamed: dict[str, dict] = {}  # service -> {"sent": bytes, "complete": bool, "done": bool}
        self.lock = threading.Lock()
        self.search_template = fixture("search_results_sanborn_maps.json")
        self.manifest_template = fixture("iiif_manifest_2011633553.json")["manifest"]
        # The catalogue search (/maps/): which items it returns and how it pages.
        self.catalogue: list[int] | None = None  # item numbers, in result order (default 1..items)
        self.years: dict[int, int | None] = {}  # item number -> year (None: undated); default 1850 + n
        self.result_cap = 100_000  # no page may start past this many results
        self.matched: dict[tuple, list[int]] = {}  # date range -> item numbers (see ``matching``)
        self.throttle: dict[str, str] = {}  # path fragment -> Retry-After of a 429 sent to its first request
        self.fail: dict[str, int] = {}  # path fragment -> HTTP status sent to every request
        self.gone: set[int] = set()  # item numbers the item endpoint answers 404 for
        self.hold_after: int | None = None  # answer this many catalogue pages, then hold the next one ...
        self.holding = threading.Event()  # ... set when it arrives ...
        self.release = threading.Event()  # ... and answered (503) once this is set
        self.item_template = fixture("item_2007680728_item_attribute.json")["item"]
        # loc.gov's rate limits as it enforces them: it counts requests as they arrive, after a
        # network delay that varies.  ``limit`` (count, seconds): a request arriving when the last
        # ``seconds`` already saw ``count`` is answered 429 (Retry-After: 0, so a run goes on and
        # every overrun is counted in ``.too_many``).  Every request is counted after a random delay
        # of up to ``jitter`` seconds (seeded).
        self.limit: tuple[int, float] | None = None
        self.jitter = 0.0
        self.too_many = 0
        self.arrivals: list[float] = []  # time.monotonic() of each request counted against ``limit``
        self.random = random.Random(18)
        # A request budget: past ``budget`` requests every request is answered 429 without
        # Retry-After, which stops a load or crawl at once (as loc.gov blocks a client), so a test
        # whose code has gone wrong fails in seconds instead of paging on at the limiter's pace.
        self.budget: int | None = None
        self.over_budget = 0  # requests refused for the budget

    # -- content --------------------------------------------------------------------
    def item_id(self, n: int) -> str:
        return f"testmap{n:04d}"

    def service(self, n: int, sheet: int = 1) -> str:
        kind = self.bad.get(n, "ok") if sheet == 1 else "ok"
        return f"{self.url}/iiif/service:gmd:test:{kind}:{n:04d}_{sheet:03d}"

    def result(self, n: int) -> dict:
        result = copy.deepcopy(self.search_template["results"][0])
        item_id = self.item_id(n)
        service = self.service(n)
        result.update(
            id=f"{self.url}/item/{item_id}/",
            url=f"{self.url}/item/{item_id}/",
            title=f"Test map {n} of Arkadelphia, Clark County, Arkansas.",
            date=str(1850 + n),
            image_url=[
                f"{service}/full/pct:12.5/0/default.jpg#h=956&w=806",
                f"{service}/full/pct:25/0/default.jpg#h=1912&w=1612",
            ],
        )
        result["resources"][0]["files"] = self.sheets.get(n, 1)
        result["resources"][0]["url"] = f"{self.url}/resource/{item_id}/"
        return result

    def search_page(self, page: int, base_query: dict) -> dict:
        start = (page - 1) * self.per_page
        numbers = range(start + 1, min(start + self.per_page, self.items) + 1)
        pages = -(-self.items // self.per_page)
        data = copy.deepcopy(self.search_template)
        query = dict(base_query, sp=str(page + 1))
        data["pagination"].update(
            current=page, of=self.items, total=pages, perpage=self.per_page,
            next=f"{self.url}/collections/test-maps/?{urllib.parse.urlencode(query)}" if page < pages else None,
        )
        data["results"] = [self.result(n) for n in numbers]
        return data

    def manifest(self, n: int) -> dict:
        manifest = copy.deepcopy(self.manifest_template)
        canvas_template = manifest["sequences"][0]["canvases"][0]
        canvases = []
        for sheet in range(1, self.sheets.get(n, 1) + 1):
            canvas = copy.deepcopy(canvas_template)
            service = self.service(n, sheet)
            canvas["@id"] = service
            canvas["images"][0]["resource"]["@id"] = f"{service}/full/pct:25/0/default.jpg"
            canvas["images"][0]["resource"]["service"]["@id"] = service
            canvas["service"]["@id"] = service
            canvases.append(canvas)
        manifest["sequences"][0]["canvases"] = canvases
        return manifest

    def item(self, n: int) -> dict:
        item = copy.deepcopy(self.item_template)
        item.update(
            title=f"Catalogued map {n}",
            date=f"{1900 + n}-01-01",
            subjects=[{"fire insurance maps": "x"}, {"arkansas": "y"}],
            subject=["fire insurance maps", "arkansas"],
            contributor_names=["Sanborn Map Company"],
            location=["arkansas", "little rock"],
        )
        return {"item": item}

    def image(self, service: str) -> tuple[int, str, bytes, dict]:
        name = service.rsplit("/", 1)[-1]  # service:gmd:test:<kind>:<n>_<sheet>
        kind = name.split(":")[3] if name.count(":") >= 4 else "ok"
        with self.lock:
            hits = self.hits[service] = self.hits.get(service, 0) + 1
        if service in self.retry_after and hits == 1:
            status = self.retry_status.get(service, 429)
            return status, "text/plain", b"slow down", {"Retry-After": self.retry_after[service]}
        if kind in ("huge", "chunked", "close"):
            return 200, "image/jpeg", self.big_body(service), {"mode": kind}
        if kind == "missing":
            return 404, "text/html", b"<html>not found</html>", {}
        if kind == "html":
            return 200, "text/html", b"<!DOCTYPE html><html><body>Service unavailable</body></html>", {}
        if kind == "truncated":
            return 200, "image/jpeg", map_image(service)[:600], {}
        if kind == "flaky" and hits == 1:
            return 503, "text/plain", b"try again", {}
        return 200, "image/jpeg", map_image(service), {}

    def big_body(self, service: str):
        """A valid JPEG then padding (decoders ignore bytes after the end marker), in chunks."""
        head = map_image(service)
        padding = b"\0" * (1 << 16)
        yield head
        sent = len(head)
        while sent < self.big_bytes:
            chunk = padding[: self.big_bytes - sent]
            yield chunk
            sent += len(chunk)

    def wait_streamed(self, service: str, timeout: float = 10.0) -> dict:
        """The record of an oversized response once the server has stopped sending it."""
        deadline = time.monotonic() + timeout
        while not self.streamed.get(service, {}).get("done"):
            assert time.monotonic() < deadline, f"{service} still streaming after {timeout} s"
            time.sleep(0.01)
        return self.streamed[service]

    # -- the catalogue search ---------------------------------------------------------
    def year(self, n: int) -> int | None:
        return self.years[n] if n in self.years else 1850 + n

    def catalogue_result(self, n: int) -> dict:
        result = self.result(n)
        year = self.year(n)
        result["title"] = f"Search result map {n}"
        for key in ("date", "dates", "sort_date"):
            result.pop(key, None)
        if year is not None:
            result.update(date=str(year), dates=[f"{year}-01-01T00:00:00Z"])
        return result

    def matching(self, dates: str | None) -> list[int]:
        """The catalogue's item numbers in a date range (all without one), kept per range while
        ``catalogue`` and ``years`` stay the same objects: a benchmark pages through 562,842."""
        key = (dates, id(self.catalogue), id(self.years), len(self.years), self.items)
        with self.lock:
            if key not in self.matched:
                numbers = self.catalogue if self.catalogue is not None else list(range(1, self.items + 1))
                if dates:
                    low, high = (int(v) for v in dates.split("/"))
                    numbers = [n for n in numbers if self.year(n) is not None and low <= self.year(n) <= high]
                self.matched[key] = numbers
            return self.matched[key]

    def catalogue_page(self, path: str, query: dict) -> tuple[int, dict]:
        per_page = min(int(query.get("c", "25")), 150)
        page = int(query.get("sp", "1"))
        numbers = self.matching(query.get("dates"))
        start = (page - 1) * per_page
        if start >= self.result_cap:
            return 400, {"status": 400, "error": f"paging past {self.result_cap} results is not supported"}
        pages = -(-len(numbers) // per_page)
        following = dict(query, sp=str(page + 1))
        data = {
            "pagination": {"current": page, "of": len(numbers), "total": pages, "perpage": per_page,
                           "from": start + 1, "to": min(start + per_page, len(numbers)),
                           "next": f"{self.url}{path}?{urllib.parse.urlencode(following)}" if page < pages else None},
            "results": [self.catalogue_result(n) for n in numbers[start:min(start + per_page, self.result_cap)]],
            "facets": [{"filters": [{"count": 1, "term": str(year)}]} for year in range(1000, 2100)],
        }
        if "at" in query:
            data = {key: value for key, value in data.items() if key in query["at"].split(",")}
        return 200, data

    def page_requests(self) -> list[str]:
        """The catalogue search requests received, in order."""
        return [path for path in self.requests if path.startswith(("/maps/", "/search/"))]

    def item_requests(self) -> list[str]:
        return [path for path in self.requests if path.startswith("/item/") and "manifest" not in path]

    def counted_over_limit(self) -> bool:
        """Count one request against ``limit`` as loc.gov would when it arrives (after the
        jitter); True if it is one too many."""
        with self.lock:
            delay = self.random.uniform(0, self.jitter)
        time.sleep(delay)
        count, seconds = self.limit
        with self.lock:
            now = time.monotonic()
            recent = sum(1 for t in self.arrivals if t > now - seconds)
            self.arrivals.append(now)
            if recent >= count:
                self.too_many += 1
                return True
        return False

    # -- server ---------------------------------------------------------------------
    def start(self) -> "LocServer":
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, content_type, body, headers=None):
                if not isinstance(body, bytes):
                    return self.stream(status, content_type, body, headers.pop("mode"))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a browser cancels tiles it no longer shows)

            def stream(self, status, content_type, chunks, mode):
                """Send an oversized body: 'huge' with Content-Length, 'chunked' (HTTP/1.1) or
                'close' (HTTP/1.0, no length); record how much the client took."""
                service = f"{server_ref.url}{self.path.rsplit('/full/', 1)[0]}"
                record = server_ref.streamed[service] = {"sent": 0, "complete": False, "done": False}
                if mode == "chunked":
                    self.protocol_version = "HTTP/1.1"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if mode == "huge":
                    self.send_header("Content-Length", str(server_ref.big_bytes))
                elif mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for chunk in chunks:
                        if mode == "chunked":
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        else:
                            self.wfile.write(chunk)
                        record["sent"] += len(chunk)
                    if mode == "chunked":
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    record["complete"] = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: it abandoned the body
                finally:
                    self.close_connection = True
                    record["done"] = True

            def catalogue(self, path, query):
                with server_ref.lock:
                    answered = len(server_ref.page_requests()) - 1
                if server_ref.hold_after is not None and answered >= server_ref.hold_after:
                    server_ref.holding.set()  # the client is killed while it waits for this page
                    server_ref.release.wait(30)
                    try:
                        return self.send(503, "text/plain", b"held")
                    except OSError:
                        return None
                status, data = server_ref.catalogue_page(path, query)
                return self.send(status, "application/json", json.dumps(data).encode())

            def do_GET(self):
                server_ref.log.append((time.monotonic(), self.path))
                server_ref.user_agents.add(self.headers.get("user-agent", ""))
                server_ref.requests.append(self.path)
                if server_ref.budget is not None and len(server_ref.requests) > server_ref.budget:
                    with server_ref.lock:
                        server_ref.over_budget += 1
                    return self.send(429, "text/plain", b"request budget of this test spent")
                if server_ref.limit is not None and server_ref.counted_over_limit():
                    return self.send(429, "text/plain", b"too many requests", {"Retry-After": "0"})
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                segments = parts.path.strip("/").split("/")
                for fragment, status in server_ref.fail.items():
                    if fragment in self.path:
                        return self.send(status, "text/plain", b"failing on purpose")
                for fragment, wait in list(server_ref.throttle.items()):
                    if fragment in self.path:
                        del server_ref.throttle[fragment]
                        return self.send(429, "text/plain", b"slow down", {"Retry-After": wait})
                if parts.path in ("/maps/", "/search/"):
                    return self.catalogue(parts.path, query)
                if parts.path.startswith("/collections/test-maps"):
                    page = int(query.get("sp", "1"))
                    base = {k: v for k, v in query.items() if k != "sp"}
                    return self.send(200, "application/json", json.dumps(server_ref.search_page(page, base)).encode())
                if segments[0] == "item" and len(segments) >= 2:
                    n = int(segments[1].replace("testmap", "") or 0)
                    if n in server_ref.gone:
                        return self.send(404, "text/html", b"<html>not found</html>")
                    if segments[-1] == "manifest.json":
                        return self.send(200, "application/json", json.dumps(server_ref.manifest(n)).encode())
                    return self.send(200, "application/json", json.dumps(server_ref.item(n)).encode())
                cors = {"Access-Control-Allow-Origin": "*"}
                if segments[0] == "iiif" and len(segments) == 3 and segments[2] == "info.json":
                    service = f"{server_ref.url}/iiif/{segments[1]}"
                    return self.send(200, "application/json", json.dumps(iiif_info(service)).encode(), cors)
                if segments[0] == "iiif" and len(segments) == 6 and segments[2] not in ("full", "square"):
                    tile = iiif_tile(f"{server_ref.url}/iiif/{segments[1]}", segments[2], segments[3])
                    if tile is None:
                        return self.send(400, "text/plain", b"bad region or size")
                    return self.send(200, "image/jpeg", tile, cors)
                if segments[0] == "iiif" and len(segments) == 6:
                    service = f"{server_ref.url}/iiif/{segments[1]}"
                    status, content_type, body, headers = server_ref.image(service)
                    return self.send(status, content_type, body, headers)
                self.send(404, "text/plain", b"no such route")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
