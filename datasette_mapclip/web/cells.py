"""Datasette's own table and row pages of a collection's ``maps`` table: the stored thumbnail shown
as a small picture (from the plugin's thumbnail route, which makes the table page's permission
checks again) instead of ``<Binary: N bytes>``."""

from __future__ import annotations

from markupsafe import Markup, escape

from .. import store
from .state import collections_of
from .urls import MapclipUrls

THUMBNAIL_COLUMN = "thumbnail"
SHOWN_PX = 96  # the picture's box on the table page


def thumbnail_cell(datasette, row, value, column, table, database):
    """The hook's answer: None (Datasette's own rendering) for every other cell."""
    if column != THUMBNAIL_COLUMN or table != store.MAPS_TABLE or not isinstance(value, bytes) or not value:
        return None
    try:
        map_id = int(row["id"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None

    async def inner():
        if not await collections_of(datasette).holds(database):
            return None  # another tool's table that happens to be called maps
        url = MapclipUrls(datasette).thumbnail(database, map_id)
        return Markup(f'<img src="{escape(url)}" alt="Thumbnail of map {map_id}" loading="lazy" '
                      f'style="max-width: {SHOWN_PX}px; max-height: {SHOWN_PX}px">')

    return inner
