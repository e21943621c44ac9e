"""Catalogue fields for many stored items at once, from loc.gov search pages (``mapclip loc-metadata``).

The item endpoint answers one item per request, and loc.gov's limits for it (10 / 10 s, 200 /
minute) allow 60 a minute: ~156 hours for the paper's 562,842 maps.  A search or collection page
carries the same catalogue fields for up to 150 items per request at 80 requests a minute, so
paging through the search the items belong to is ~200x faster.  (The limiter sends both ~10%
slower than these published limits: ``loaders.fetch.SAFETY_MARGIN``.)  Results are matched to stored items by item id; items no page returned are
asked for one by one at the item endpoint afterwards (``loc.fill_metadata``).

loc.gov facts this relies on (https://www.loc.gov/apis/json-and-yaml/ and its requests and
search-results pages; shared fixture search_results_sanborn_maps.json):
- search endpoints (``/search/``, formats such as ``/maps/``, ``/collections/<name>/``) take
  ``fo=json``, ``c`` results per page (``perpage_options`` 25, 50, 100, 150), ``sp`` the page
  (from 1), ``dates=FROM/TO`` a year range (``dates=1800/1899`` in the fixture's own request),
  ``fa`` facet filters, and ``at=`` the top-level attributes to return
  (``at=results,pagination`` leaves out the large facet lists);
- ``pagination.of`` is the number of results of the search;
- paging past 100,000 results of one search is not supported;
- published limits: collections, format and search endpoints 20 / 10 s and 80 / minute;
  item and resource endpoints 10 / 10 s and 200 / minute (``loc.ITEM_LIMITS``; an HTTP 429 means
  stop and wait).

Partitions.  A search with more results than the cap is split into date ranges: the year range
in two halves, and each half again while its ``pagination.of`` passes the cap, so every part can
be paged to its end.  A single year over the cap cannot be split: its first ``cap`` results are
paged and the rest are left to the item endpoint.  Items without a date (or dated outside the
range) fall in no date range: when the whole search fits under the cap it is paged as one
partition and they come with it; otherwise the item endpoint fallback asks for them (loc.gov has
no "undated" filter to page them through).  Each partition and each page fetched is stored in
the transaction that fills the page's items, so a rerun resumes at the first page not committed.
"""

from __future__ import annotations

import datetime
import math
import re
import urllib.parse
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from datasette_mapclip.store.records import MapRecord

from ..fetch import Fetcher, FetchError, RateLimited, request_interval
from .file_list import item_id_from_url
from .loc import ITEM_LIMITS, SEARCH_LIMITS, catalogue_fields, fill_metadata

PAGE_SIZE = 150  # loc.gov's largest page (pagination.perpage_options: 25, 50, 100, 150)
RESULT_CAP = 100_000  # loc.gov does not page past 100,000 results of one search
FIRST_YEAR = 1000  # the year range partitioned starts here (parse_year's range)
# --method auto asks the item endpoint straight away when that takes less than this long: a
# search probe would most likely point at a collection far larger than a handful of items.
SMALL_SET_SECONDS = 60.0
PAGING_PARAMETERS = ("fo", "c", "sp", "at", "dates")
SANBORN_ITEM = re.compile(r"^sanborn\d")


SEARCH_SECONDS = request_interval(SEARCH_LIMITS)  # as the limiter spaces them, margin included
ITEM_SECONDS = request_interval(ITEM_LIMITS)


def default_years() -> tuple[int, int]:
    return FIRST_YEAR, datetime.date.today().year


def parse_dates(text: str) -> tuple[int, int]:
    """``"1850/1899"`` -> (1850, 1899); ValueError with a readable message otherwise."""
    match = re.fullmatch(r"\s*(\d{1,4})\s*/\s*(\d{1,4})\s*", text or "")
    if not match or int(match.group(1)) > int(match.group(2)):
        raise ValueError(f"{text!r} is not a year range FROM/TO such as 1500/2025")
    return int(match.group(1)), int(match.group(2))


def derive_search(api: str, item_ids) -> str:
    """The search whose pages hold these items: the Sanborn collection when every item is a
    Sanborn volume (``sanborn00192_001``), else loc.gov's maps format, which holds every map."""
    api = api.rstrip("/")
    ids = list(item_ids)
    if ids and all(SANBORN_ITEM.match(item_id) for item_id in ids):
        return f"{api}/collections/sanborn-maps/"
    return f"{api}/maps/"


def base_search(url: str) -> tuple[str, tuple[int, int] | None]:
    """A search URL without its paging parameters (the key its crawl progress is stored under),
    and the year range of its own ``dates=`` if it has one."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own_dates = next((value for key, value in query if key == "dates"), None)
    kept = sorted((key, value) for key, value in query if key not in PAGING_PARAMETERS)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    base = urllib.parse.urlunsplit(parts._replace(path=path, query=urllib.parse.urlencode(kept, safe=":/,|"),
                                                  fragment=""))
    try:
        return base, parse_dates(own_dates) if own_dates else None
    except ValueError:
        return base, None


def page_url(search: str, dates: str, page: int, page_size: int = PAGE_SIZE) -> str:
    """One page of a partition: JSON, ``page_size`` results, only results and pagination."""
    parts = urllib.parse.urlsplit(search)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if dates:
        query.append(("dates", dates))
    query += [("fo", "json"), ("c", str(page_size)), ("sp", str(page)), ("at", "results,pagination")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe=":/,|")))


def halves(dates: str, years: tuple[int, int]) -> list[str] | None:
    """The two date ranges a partition splits into; None for a single year (cannot split)."""
    low, high = parse_dates(dates) if dates else years
    if low >= high:
        return None
    middle = (low + high) // 2
    return [f"{low}/{middle}", f"{middle + 1}/{high}"]


@dataclass
class CatalogueSummary:
    items: int = 0  # items this run set out to fill
    filled: int = 0
    failed: int = 0  # a request for them failed (load_errors says why); a rerun asks again
    missing: int = 0  # loc.gov returned them nowhere: not on any page (--method bulk), item 404
    method: str = "item"  # 'bulk' when search pages were paged
    search: str | None = None
    search_requests: int = 0
    failed_pages: int = 0
    partitions: int = 0
    item_requests: int = 0

    @property
    def left(self) -> int:
        return max(0, self.items - self.filled - self.failed - self.missing)

    def line(self) -> str:
        line = f"{self.filled} of {self.items} items filled, {self.failed} failed, {self.missing} missing"
        if self.left:
            line += f", {self.left} left for a rerun"
        requests = []
        if self.search_requests or self.search:
            requests.append(f"{self.search_requests} search pages over {self.partitions} partitions"
                            + (f" ({self.failed_pages} failed)" if self.failed_pages else ""))
        requests.append(f"{self.item_requests} item requests")
        return f"{line} ({', '.join(requests)})"


@dataclass(frozen=True)
class PageTask:
    dates: str
    page: int


class CatalogueCrawl:
    """Pages through one search, partitioned by date ranges under the result cap, filling the
    stored items it finds.  ``missing``: the item ids still to fill (shrinks as pages arrive)."""

    def __init__(self, store, fetcher: Fetcher, search: str, missing: set[str], *, years: tuple[int, int],
                 cap: int = RESULT_CAP, page_size: int = PAGE_SIZE, workers: int = 4, limit: int | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print):
        self.store = store
        self.fetcher = fetcher
        self.search = search
        self.missing = missing
        self.years = years
        self.cap = cap
        self.page_size = page_size
        self.workers = workers
        self.limit = limit
        self.progress = progress
        self.echo = echo
        self.filled = self.requests = self.failed_pages = 0
        if not store.catalogue_partitions(search):
            store.add_catalogue_partitions(search, [("", None)])
        self.parts = {p["dates"]: p for p in store.catalogue_partitions(search)}

    # -- what is left ---------------------------------------------------------------
    def pending(self) -> list[PageTask]:
        tasks = []
        for part in self.parts.values():
            if part["state"] == "todo":
                tasks.append(PageTask(part["dates"], 1))
            elif part["state"] == "paging":
                tasks += [PageTask(part["dates"], page) for page in range(1, part["pages"] + 1)
                          if page not in part["done"]]
        return tasks

    def remaining_requests(self) -> int:
        """Requests the rest of the crawl should take (an unfetched partition expects half its parent's
        results)."""
        left = 0
        for part in self.parts.values():
            if part["state"] == "todo":  # its share of pages, and a first page of its own if it will split
                expected = part["expected"] or self.page_size
                left += max(1, math.ceil(expected / self.page_size)) + (expected > self.cap)
            elif part["state"] == "paging":
                left += part["pages"] - len(part["done"])
        return left

    def finished(self) -> bool:
        return not self.missing or (self.limit is not None and self.filled >= self.limit)

    def complete(self) -> bool:
        """Every partition paged to its end: what no page returned is not in this search."""
        return all(part["state"] in ("split", "done") for part in self.parts.values())

    # -- crawling -------------------------------------------------------------------
    def probe(self):
        """Fetch the first page of the whole search if not yet fetched (its total decides
        whether paging it is worth it)."""
        root = self.parts.get("")
        if root and root["state"] == "todo":
            self.run(only=[PageTask("", 1)])

    def run(self, only: list[PageTask] | None = None):
        """Fetch pages (``workers`` at a time, all through the fetcher's shared limiter) until
        none is left or nothing is missing.  A failed page is recorded and skipped; a long 429
        (RateLimited) stops the crawl once the pages in flight are stored."""
        from tqdm import tqdm

        queue = deque(only if only is not None else self.pending())
        in_flight = {}
        stopped = None
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="loc-catalogue")
        bar = tqdm(total=self.requests + self.remaining_requests(), initial=self.requests, unit="page",
                   desc="catalogue pages", disable=not self.progress or only is not None)
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.workers and stopped is None and not self.finished():
                    task = queue.popleft()
                    in_flight[pool.submit(self.fetcher.get_json, self.url(task))] = task
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    task = in_flight.pop(future)
                    self.requests += 1
                    try:
                        page = future.result()
                        if not isinstance(page, dict) or not isinstance(page.get("results", []), list):
                            raise FetchError("not a loc.gov search page (no list of results)")
                    except RateLimited as error:
                        stopped = stopped or error
                        continue
                    except FetchError as error:
                        self.page_failed(task, error)
                        continue
                    if only is None:
                        queue.extend(self.store_page(task, page))
                    else:
                        self.store_page(task, page)
                    bar.total = self.requests + self.remaining_requests()
                    bar.update(1)
                    bar.set_postfix(filled=self.filled, refresh=False)
        finally:
            pool.shutdown(wait=stopped is not None, cancel_futures=True)
            bar.close()
        if stopped is not None:
            raise stopped

    def url(self, task: PageTask) -> str:
        return page_url(self.search, task.dates, task.page, self.page_size)

    def store_page(self, task: PageTask, page: dict) -> list[PageTask]:
        """Fill the page's stored items and record it; returns the pages it makes known."""
        part = self.parts[task.dates]
        results = page.get("results") or []
        pagination = page.get("pagination") if isinstance(page.get("pagination"), dict) else {}
        filled = self.match(results)
        resolved = [f"metadata-page:{self.url(task)}"]
        if task.page != 1 or part["state"] != "todo":
            part["done"].add(task.page)
            state = "done" if len(part["done"]) >= (part["pages"] or 0) else None
            self.store.record_catalogue_page(self.search, task.dates, task.page, filled, results=len(results),
                                             state=state, resolved_error_ids=resolved)
            part["state"] = state or part["state"]
            return []
        total = _int(pagination.get("of"))
        total = len(results) if total is None else total
        split = halves(task.dates, self.years) if total > self.cap else None
        if split:
            expected = [(half, total // 2) for half in split]
            self.store.record_catalogue_page(self.search, task.dates, 1, filled, results=len(results), total=total,
                                             pages=0, state="split", split=expected, resolved_error_ids=resolved)
            part.update(state="split", total=total, pages=0)
            for half, guess in expected:
                self.parts.setdefault(half, {"dates": half, "expected": guess, "total": None, "pages": None,
                                             "state": "todo", "done": set()})
            return [PageTask(half, 1) for half in split]
        if total > self.cap:
            self.echo(f"note: {task.dates or 'the search'} alone holds {total:,} results, more than loc.gov pages through "
                      f"({self.cap:,}); the items past them are asked for at the item endpoint")
        pages = max(1, math.ceil(min(total, self.cap) / self.page_size))
        state = "done" if pages == 1 else "paging"
        self.store.record_catalogue_page(self.search, task.dates, 1, filled, results=len(results), total=total,
                                         pages=pages, state=state, resolved_error_ids=resolved)
        part.update(state=state, total=total, pages=pages)
        part["done"].add(1)
        return [PageTask(task.dates, number) for number in range(2, pages + 1)]

    def match(self, results: list) -> dict[str, dict]:
        """Item id -> catalogue fields, for the results that are stored items still missing them.
        A result without a title is left to the item endpoint (a row without one counts as unfilled)."""
        filled = {}
        for result in results:
            if not isinstance(result, dict):
                continue
            item_id = item_id_from_url(str(result.get("id") or result.get("url") or ""))
            if item_id not in self.missing:
                continue
            fields = catalogue_fields(result)
            if fields["title"]:
                filled[item_id] = fields
                self.missing.discard(item_id)
        self.filled += len(filled)
        return filled

    def page_failed(self, task: PageTask, error: FetchError):
        """Record a page that failed after the fetcher's retries and go on: its items are asked
        for at the item endpoint, and a rerun asks for the page again (it is not marked fetched)."""
        self.failed_pages += 1
        url = self.url(task)
        placeholder = MapRecord(source_id=f"metadata-page:{url}", location=url, source="loc-metadata")
        with self.store.transaction():
            self.store.record_error(placeholder, "metadata",
                                    f"search page failed: {error}; its items go to the item endpoint, "
                                    "and a rerun asks for the page again")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def bulk_is_cheaper(search_requests: int, items: int) -> bool:
    """Paging the search takes less time at loc.gov's limits than one item request per item."""
    return search_requests * SEARCH_SECONDS < items * ITEM_SECONDS


def fill_catalogue(store, search_fetcher: Fetcher, item_fetcher: Fetcher, *, api: str, search: str | None = None,
                   method: str = "auto", years: tuple[int, int] | None = None, cap: int = RESULT_CAP,
                   page_size: int = PAGE_SIZE, workers: int = 4, limit: int | None = None, recrawl: bool = False,
                   progress: bool = True, echo: Callable[[str], None] = print,
                   summary: CatalogueSummary | None = None) -> CatalogueSummary:
    """Fill the catalogue fields of stored items that lack them: search pages first (``method``
    'bulk', or 'auto' when that is cheaper), then the item endpoint for what they did not return
    ('auto', 'item').  ``summary`` (optional) is filled in as the run goes, so a caller still has
    the counts when a long 429 stops it."""
    summary = summary if summary is not None else CatalogueSummary()
    item_ids = store.items_missing_catalogue()
    summary.items = len(item_ids) if limit is None else min(limit, len(item_ids))
    if not item_ids:
        return summary
    missing = set(item_ids)
    crawl = None
    if method == "bulk" or (method == "auto" and len(item_ids) * ITEM_SECONDS > SMALL_SET_SECONDS):
        key, own_years = base_search(search or derive_search(api, item_ids))
        summary.search = key
        if recrawl:
            store.forget_catalogue_crawl(key)
        crawl = CatalogueCrawl(store, search_fetcher, key, missing, years=years or own_years or default_years(),
                               cap=cap, page_size=page_size, workers=workers, limit=limit, progress=progress,
                               echo=echo)
        try:
            crawl.probe()
            pages = crawl.remaining_requests()
            if crawl.complete():
                echo(f"every page of {key} was fetched by an earlier run (--recrawl pages it again)")
            elif crawl.parts[""]["state"] == "todo":
                echo(f"the first page of {key} failed (see load_errors); "
                     + ("rerun to try again" if method == "bulk" else "asking the item endpoint"))
            elif method == "bulk" or bulk_is_cheaper(pages, len(missing)):
                summary.method = "bulk"
                echo(f"paging through {key}: about {pages:,} search pages for {len(missing):,} items")
                crawl.run()
            else:
                echo(f"asking the item endpoint: {len(missing):,} items take less time than the "
                     f"{pages:,} pages left of {key}")
        finally:
            summary.filled = crawl.filled
            summary.search_requests, summary.failed_pages = crawl.requests, crawl.failed_pages
            summary.partitions = len(crawl.parts)
    left = [item_id for item_id in item_ids if item_id in missing]
    budget = None if limit is None else max(0, limit - summary.filled)
    if method == "bulk":
        if crawl.complete():
            note_missing(store, left[:budget], key)
            summary.missing = len(left[:budget])
        return summary
    if budget == 0 or not left:
        return summary
    result = fill_metadata(store, item_fetcher, api=api, item_ids=left, limit=budget, progress=progress)
    summary.filled += result["filled"]
    summary.failed += result["failed"]
    summary.missing += result["missing"]
    summary.item_requests += result["requests"]
    return summary


def note_missing(store, item_ids: list[str], search: str):
    """A load_errors row per item the whole search never returned (--method bulk)."""
    with store.transaction():
        for item_id in item_ids:
            placeholder = MapRecord(source_id=f"metadata:{item_id}", location=search, source="loc-metadata")
            store.record_error(placeholder, "metadata",
                               f"not on any page of {search}; `mapclip loc-metadata` without --method bulk "
                               "asks the item endpoint for it")
