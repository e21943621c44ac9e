"""The plugin's own paths that name a database (a map's page, a stored thumbnail), built and read
the way Datasette builds and reads its own: the database's route, tilde-encoded
(``datasette.urls.database``: ``карты`` -> ``~D0~BA~D0~B0...``, a space -> ``+``), decoded with
``tilde_decode`` and looked up by route.  Also the download header for a file name that may hold
any character."""

from __future__ import annotations

import re
import urllib.parse

from datasette.utils import tilde_decode, tilde_encode

# In a path: a tilde-encoded database route, then a map id in ASCII digits (``\d`` would also
# match other scripts' digits).
DATABASE = r"(?P<database>[^/]+)"
MAP_ID = r"(?P<id>[0-9]+)"


def database_segment(datasette, database: str) -> str:
    """A database's part of a path, as Datasette's own URLs write it."""
    db = datasette.databases.get(database)
    return tilde_encode(db.route if db is not None else database)


def database_from_segment(datasette, segment: str) -> str | None:
    """The name of the database a path segment names, or None.  Datasette's own decoding first
    (tilde, by route); then percent-decoding, for links made before the plugin tilde-encoded."""
    route = tilde_decode(segment)
    for name, db in datasette.databases.items():
        if db.route == route:
            return name
    name = urllib.parse.unquote(segment)
    return name if name in datasette.databases else None


class MapclipUrls:
    """Every URL of the plugin's own pages, built here and nowhere else (as Datasette's ``Urls``
    builds its own), with Datasette's ``base_url`` applied.  ``query`` is a search's query string
    (``SearchParams.query_string()``); ``database`` adds ``_db``."""

    PAGE = "/-/mapclip"
    SEARCH_JSON = "/-/mapclip/search.json"
    ABOUT = "/-/mapclip/about"
    EXPORT = "/-/mapclip/export"     # .csv, .json
    MAP = "/-/mapclip/map"           # /<database>/<id>[.json|.bib|.csl.json|.txt]
    THUMBNAIL = "/-/mapclip/thumbnail"  # /<database>/<id>.jpg
    IMAGE = "/-/mapclip/image"       # /<database>/<id>.jpg: a map's local image, for the deep-zoom viewer

    def __init__(self, datasette):
        self.datasette = datasette

    def _url(self, path: str, query: str = "", database: str | None = None) -> str:
        parts = [part for part in (query, urllib.parse.urlencode({"_db": database}) if database else "") if part]
        return self.datasette.urls.path(path) + ("?" + "&".join(parts) if parts else "")

    def page(self, query: str = "", database: str | None = None) -> str:
        return self._url(self.PAGE, query, database)

    def search_json(self, query: str = "", database: str | None = None) -> str:
        return self._url(self.SEARCH_JSON, query, database)

    def about(self, database: str | None = None) -> str:
        return self._url(self.ABOUT, "", database)

    def export(self, extension: str, query: str = "", database: str | None = None) -> str:
        return self._url(f"{self.EXPORT}.{extension}", query, database)

    def map(self, database: str, map_id: int) -> str:
        """A map's own page."""
        return self._url(f"{self.MAP}/{database_segment(self.datasette, database)}/{int(map_id)}")

    def thumbnail(self, database: str, map_id: int) -> str:
        """A stored thumbnail."""
        return self._url(f"{self.THUMBNAIL}/{database_segment(self.datasette, database)}/{int(map_id)}.jpg")

    def image(self, database: str, map_id: int) -> str:
        """A map's local image, re-encoded for the deep-zoom viewer."""
        return self._url(f"{self.IMAGE}/{database_segment(self.datasette, database)}/{int(map_id)}.jpg")


def routes(views, map_views) -> list[tuple[str, object]]:
    """The plugin's routes, from the same paths the URLs above are built from."""
    def at(path: str) -> str:
        return "^" + re.escape(path)

    urls = MapclipUrls
    return [
        (at(urls.PAGE) + "$", views.mapclip_page),
        (at(urls.ABOUT) + "$", views.about_page),
        (at(urls.SEARCH_JSON) + "$", views.search_json),
        (at(urls.THUMBNAIL) + rf"/{DATABASE}/{MAP_ID}\.jpg$", views.thumbnail),
        (at(urls.IMAGE) + rf"/{DATABASE}/{MAP_ID}\.jpg$", map_views.map_image),
        (at(urls.MAP) + rf"/{DATABASE}/{MAP_ID}(?P<format>\.json|\.bib|\.csl\.json|\.txt)?$", map_views.map_page),
        (at(urls.EXPORT) + r"\.(?P<format>csv|json)$", map_views.export_results),
    ]


def attachment(filename: str) -> str:
    """A Content-Disposition for a download of any name (RFC 6266): an ASCII ``filename`` with
    nothing that could end the quoted string or the header, and the real name in ``filename*``
    (RFC 5987, UTF-8, percent-encoded)."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("._") or "download"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"
