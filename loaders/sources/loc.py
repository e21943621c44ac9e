"""loc.gov JSON API: search or collection pages -> records, IIIF manifests for multi-sheet items,
and catalogue metadata for rows that arrived without it (the seed's file list, beto.pt).

loc.gov's published limits (no key): search/collection 20 requests / 10 s and 80 / minute;
item 10 / 10 s and 200 / minute.  Exceeding them blocks the client for 5 minutes or an hour.
``SEARCH_LIMITS`` and ``ITEM_LIMITS`` are those published numbers; the limiter books them with our
own safety margin and evenly spaced (``loaders.fetch.SAFETY_MARGIN``, ``request_interval``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

from datasette_mapclip.model import iiif
from datasette_mapclip.store.records import MapRecord, parse_year

from ..fetch import Fetcher, FetchError, RateLimiter, per_minute
from ..messages import shown
from .file_list import https, item_id_from_url

SEARCH_LIMITS = [(20, 10.0), (80, 60.0)]  # loc.gov's published limits, (requests, seconds)
ITEM_LIMITS = [(10, 10.0), (200, 60.0)]
PAGE_SIZE = 100
LOC_API = "https://www.loc.gov"


def search_url(url: str, page_size: int = PAGE_SIZE) -> str:
    """Ask for JSON (``fo=json``) and a full page of results (``c``)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query["fo"] = "json"
    query.setdefault("c", str(page_size))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe=":/,")))


def _labels(value) -> list[str]:
    """Strings from a loc.gov field: a string, a list of strings, or a list of {label: url} dicts."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        return [str(k).strip() for k in value if str(k).strip()]
    labels = []
    for entry in value:
        labels.extend(_labels(entry))
    return labels


def _first(*values) -> str | None:
    for value in values:
        labels = _labels(value)
        if labels:
            return labels[0]
    return None


def catalogue_fields(result: dict) -> dict:
    """Catalogue fields from a search result or an item endpoint ``item`` (fields come and go)."""
    nested = result.get("item") if isinstance(result.get("item"), dict) else {}
    date = _first(result.get("date"), nested.get("date"), result.get("sort_date"), result.get("created_published"))
    notes = _labels(nested.get("notes")) or _labels(result.get("notes")) or _labels(result.get("description"))
    places = _labels(result.get("location")) or _labels(result.get("locations"))
    return {
        "title": _first(result.get("title"), nested.get("title")),
        "date": date,
        "year": parse_year(date),
        "place": ", ".join(places) or None,
        "subjects": _labels(result.get("subject")) or _labels(result.get("subjects")) or _labels(result.get("subject_headings")),
        "contributors": _labels(result.get("contributor_names")) or _labels(result.get("contributor")) or _labels(result.get("contributors")),
        "notes": " ".join(note.strip() for note in notes if note.strip()) or None,
        # original_format ("map") reads as a caption; item.format is MARC ("cartographic")
        "format": _first(result.get("original_format"), nested.get("format"), result.get("format")),
    }


def _sheet_count(result: dict) -> int:
    resources = result.get("resources") or []
    try:
        return max(int(resource.get("files") or 1) for resource in resources) if resources else 1
    except (TypeError, ValueError):
        return 1


def _iiif_image(result: dict) -> str | None:
    for url in result.get("image_url") or []:
        if iiif.is_iiif_image(url):
            return url
    return None


def manifest_services(manifest: dict) -> list[str]:
    """IIIF image service ids, in canvas order, from a Presentation 2 or 3 manifest."""
    manifest = manifest.get("manifest", manifest)
    services = []
    for sequence in manifest.get("sequences") or []:
        for canvas in sequence.get("canvases") or []:
            for image in canvas.get("images") or []:
                service = (image.get("resource") or {}).get("service") or {}
                service_id = service.get("@id") or service.get("id") if isinstance(service, dict) else None
                if service_id:
                    services.append(service_id)
    for canvas in manifest.get("items") or []:  # Presentation 3
        for page in canvas.get("items") or []:
            for annotation in page.get("items") or []:
                body = annotation.get("body") or {}
                for service in body.get("service") or []:
                    if service.get("id") or service.get("@id"):
                        services.append(service.get("id") or service.get("@id"))
    return services


def _record(fields: dict, result: dict, item_id: str, item_url: str, sheet: int, image: str, size: int) -> MapRecord:
    return MapRecord(
        source_id=iiif.canonical(image),
        location=iiif.sized(image, size),
        source="loc",
        item_id=item_id,
        sheet=sheet,
        item_url=item_url,
        image_url=iiif.canonical(image),
        thumbnail_url=iiif.sized(image, iiif.THUMBNAIL_SIZE),
        **fields,
    )


class LocSearch:
    """Pages through a loc.gov search and yields one record per map sheet."""

    def __init__(self, url: str, fetcher: Fetcher, *, limit: int | None = None, all_sheets: bool = True,
                 size: int = iiif.DEFAULT_SIZE, item_fetcher: Fetcher | None = None):
        self.url = search_url(url)
        self.fetcher = fetcher
        self.item_fetcher = item_fetcher or fetcher
        self.limit = limit
        self.all_sheets = all_sheets
        self.size = size
        self.total: int | None = None
        self.problems: list[tuple[MapRecord, str]] = []  # items that could not be expanded
        self._first_page: dict | None = None

    def first_page(self) -> dict:
        """The search's first page, fetched (once) and checked to be a loc.gov JSON search answer:
        a command asks for it before it loads a model, so a wrong URL is said at once.
        FetchError says why not."""
        if self._first_page is None:
            scheme = urllib.parse.urlsplit(self.url).scheme
            if scheme not in ("http", "https"):
                raise FetchError(f"{shown(self.url)} is not an http(s) URL: give a loc.gov search or collection URL, "
                                 "e.g. https://www.loc.gov/maps/?q=railroads")
            page = self.fetcher.get_json(self.url)
            if not isinstance(page, dict) or not isinstance(page.get("results"), list):
                raise FetchError(f"{shown(self.url)} did not answer as loc.gov's JSON search API does (no results "
                                 "list): give a loc.gov search or collection URL, e.g. https://www.loc.gov/maps/?q=railroads")
            self._first_page = page
        return self._first_page

    def __iter__(self) -> Iterator[MapRecord]:
        produced = 0
        url = self.url
        while url:
            page = self.first_page() if url == self.url else self.fetcher.get_json(url)
            pagination = page.get("pagination") or {}
            if self.total is None and pagination.get("of") is not None:
                self.total = int(pagination["of"])
            for result in page.get("results") or []:
                for record in self.records_for(result):
                    if self.limit is not None and produced >= self.limit:
                        return
                    produced += 1
                    yield record
            url = pagination.get("next")

    def records_for(self, result: dict) -> Iterator[MapRecord]:
        item_url = https(result.get("url") or result.get("id"))
        item_id = item_id_from_url(result.get("id") or result.get("url")) or item_url
        image = _iiif_image(result)
        fields = catalogue_fields(result)
        if not image:
            return  # no IIIF image (a text, an audio item): nothing to embed
        sheets = _sheet_count(result)
        if sheets > 1 and self.all_sheets and item_url:
            manifest_url = item_url.rstrip("/") + "/manifest.json"
            try:
                services = manifest_services(self.item_fetcher.get_json(manifest_url))
            except FetchError as error:
                placeholder = _record(fields, result, item_id, item_url, 1, image, self.size)
                self.problems.append((placeholder, f"manifest {manifest_url}: {error}; loaded the first sheet only"))
                services = []
            if services:
                for number, service in enumerate(services, start=1):
                    yield _record(fields, result, item_id, item_url, number, iiif.from_service(service), self.size)
                return
        yield _record(fields, result, item_id, item_url, 1, image, self.size)


def limits_text(rules) -> str:
    """``[(10, 10.0), (200, 60.0)]`` -> ``"10 / 10 s, 200 / minute"`` (published limits, for help texts)."""
    return ", ".join(f"{count} / minute" if seconds == 60 else f"{count} / {seconds:g} s" for count, seconds in rules)


def limiters(image_rate: float | None) -> dict[str, RateLimiter]:
    return {
        "search": RateLimiter(SEARCH_LIMITS),
        "item": RateLimiter(ITEM_LIMITS),
        "image": per_minute(image_rate),  # fractional rates keep their meaning (0.5: one per 120 s)
    }


def fill_metadata(store, fetcher: Fetcher, *, api: str = LOC_API, limit: int | None = None, progress: bool = True,
                  item_ids: list[str] | None = None) -> dict:
    """Fill catalogue fields at the item endpoint, one request per item: for ``item_ids``, or
    every item whose maps have no title (``loc_catalogue.fill_catalogue`` pages search results
    first and sends here only what they did not return).

    Resumable: it only asks for items whose maps still lack a title, so rerunning after an
    interruption continues where it stopped.  Failures are recorded in ``load_errors``; an item
    loc.gov does not have (HTTP 404) counts as missing, any other failure as failed.
    """
    from tqdm import tqdm

    item_ids = store.items_missing_catalogue() if item_ids is None else list(item_ids)
    if limit is not None:
        item_ids = item_ids[:limit]
    done = failed = missing = 0
    for item_id in tqdm(item_ids, unit="item", desc="item endpoint", disable=not progress):
        url = f"{api.rstrip('/')}/item/{urllib.parse.quote(item_id)}/?fo=json"
        placeholder = MapRecord(source_id=f"metadata:{item_id}", location=url, source="loc-metadata")
        try:
            data = fetcher.get_json(url)
            if not isinstance(data, dict):
                raise FetchError(f"{url} did not return a loc.gov item (a JSON {type(data).__name__})")
            fields = catalogue_fields(data.get("item") if isinstance(data.get("item"), dict) else data)
        except FetchError as error:
            gone = str(error).startswith("HTTP 404")
            reason = f"loc.gov has no item {item_id} ({error})" if gone else str(error)
            with store.transaction():
                store.record_error(placeholder, "metadata", reason)
            missing += gone
            failed += not gone
            continue
        store.fill_catalogue(item_id, fields, resolved_error_id=placeholder.source_id)
        done += 1
    return {"items": len(item_ids), "filled": done, "failed": failed, "missing": missing, "requests": len(item_ids)}
