"""The shape of one map sheet as every source produces it and the store writes it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields

# Catalogue dates look like "1886-06", "[ca. 1750]", "between 1980 and 2006", "c1910";
# the first plausible year is what a range filter needs.
_YEAR = re.compile(r"(?<!\d)(1[0-9]{3}|20[0-9]{2})(?!\d)")


def parse_year(date: str | None) -> int | None:
    """The first four-digit year (1000-2099) in a catalogue date, or None."""
    if not date:
        return None
    match = _YEAR.search(str(date))
    return int(match.group(1)) if match else None


@dataclass
class MapRecord:
    """One image to embed (a map sheet) with the catalogue fields known about it.

    ``source_id`` is the stable key a load resumes on: the image URL for IIIF sources,
    the path relative to the folder for local files.  ``location`` is where the pixels
    are: an http(s) URL or a local path.
    """

    source_id: str
    location: str
    source: str
    item_id: str | None = None
    sheet: int | None = None
    title: str | None = None
    date: str | None = None
    year: int | None = None
    place: str | None = None
    subjects: list[str] = field(default_factory=list)
    contributors: list[str] = field(default_factory=list)
    notes: str | None = None
    format: str | None = None
    item_url: str | None = None
    image_url: str | None = None
    thumbnail_url: str | None = None

    def __post_init__(self):
        if self.year is None:
            self.year = parse_year(self.date)


# Fields of MapRecord in declaration order: the columns a ``maps`` row shares with it.
RECORD_FIELDS = tuple(f.name for f in fields(MapRecord))
LIST_FIELDS = tuple(f.name for f in fields(MapRecord) if f.type in ("list[str]", list))


def encode_list(values) -> str | None:
    """A list field (subjects, contributors) as stored: a JSON array, or NULL when empty."""
    return json.dumps(list(values)) if values else None


def decode_list(text) -> list[str]:
    """The stored form back to a list; a bare string (hand-edited row) becomes one element."""
    if not text:
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        return [str(text)]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]
