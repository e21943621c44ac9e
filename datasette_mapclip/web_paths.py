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


def thumbnail_path(datasette, database: str, map_id: int) -> str:
    """A stored thumbnail's URL on this server (Datasette's base_url applied)."""
    return datasette.urls.path(f"/-/mapclip/thumbnail/{database_segment(datasette, database)}/{int(map_id)}.jpg")


def map_path(datasette, database: str, map_id: int) -> str:
    """A map's own page on this server (Datasette's base_url applied)."""
    return datasette.urls.path(f"/-/mapclip/map/{database_segment(datasette, database)}/{int(map_id)}")


def attachment(filename: str) -> str:
    """A Content-Disposition for a download of any name (RFC 6266): an ASCII ``filename`` with
    nothing that could end the quoted string or the header, and the real name in ``filename*``
    (RFC 5987, UTF-8, percent-encoded)."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("._") or "download"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"
