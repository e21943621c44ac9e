"""The shape of one map sheet as every source produces it and the store writes it."""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from dataclasses import dataclass, field, fields

from .ids import MAX_ID, NumberError, whole_number

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


# -- values a source could not trust as given ---------------------------------------------

# SQLite INTEGER is 64-bit signed; a larger Python int makes the whole batch's INSERT fail.
SQLITE_MAX_INTEGER = MAX_ID
YEAR_RANGE = (-9999, 9999)
SHEET_RANGE = (0, 1_000_000)


class FieldError(ValueError):
    """A catalogue value that cannot be stored as given; the message says why, for a person."""


def parse_whole_number(text, *, name: str, low: int, high: int) -> int | None:
    """A catalogue cell as an int in [low, high], None when empty, FieldError otherwise.

    ``int()`` (not ``str.isdigit``) decides what a number is: ``isdigit`` accepts "²", which
    ``int`` refuses, while ``int`` reads other scripts' decimal digits ("١٨٥٠") correctly."""
    text = (str(text) if text is not None else "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise FieldError(f"{name} {_shorten(text)!r} is not a number (a whole number is expected)") from None
    if not low <= value <= high:
        raise FieldError(f"{name} {_shorten(text)!r} is out of range ({low} to {high})")
    return value


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def displayable(text: str) -> str:
    """``text`` as UTF-8 that SQLite accepts: bytes that were not UTF-8 (file names decoded
    with ``os.fsdecode``'s surrogateescape) become backslash escapes, ``map_\\xff.jpg``.

    The result is the same on every run, so a key made from it stays stable."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that did not come from undecodable bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def storable(record: MapRecord) -> MapRecord:
    """A copy of ``record`` whose text SQLite can store (see ``displayable``); the original
    keeps the real path for reading the file."""
    changes = {}
    for name in RECORD_FIELDS:
        value = getattr(record, name)
        if isinstance(value, str):
            fixed = displayable(value)
        elif isinstance(value, list):
            fixed = [displayable(v) if isinstance(v, str) else v for v in value]
        else:
            continue
        if fixed != value:
            changes[name] = fixed
    return dataclasses.replace(record, **changes) if changes else record


URL_FIELDS = ("item_url", "image_url", "thumbnail_url")


def unsafe_url_problems(record: MapRecord) -> list[str]:
    """Why a record's links are not http(s) URLs with a host (``javascript:``, ``data:``...).

    The plugin never renders such values as links; the loader reports them so the publisher
    knows.  Only the scheme is quoted, never the value (it may be a script)."""
    problems = []
    for name in URL_FIELDS:
        value = getattr(record, name)
        if not value:
            continue
        parts = urllib.parse.urlsplit(str(value).strip())
        if parts.scheme.lower() in ("http", "https") and parts.netloc:
            continue
        scheme = f"scheme {_shorten(parts.scheme, 20)!r}" if parts.scheme else "no scheme"
        problems.append(f"{name} is not an http(s) link ({scheme}): kept, but never shown as a link")
    return problems


@dataclass
class LoadNote:
    """Something a load should tell the publisher that is not a failed image: a catalogue value
    set to NULL, an unsafe link, a skipped symbolic link.  Stored in ``load_errors``."""

    key: str  # load_errors.source_id: a map's source_id plus the stage, or a file name
    stage: str
    reason: str
    location: str | None = None
    source: str | None = None


def note_key(source_id: str, stage: str) -> str:
    """The load_errors key of a note about a map: never equal to a map's own source_id, so
    loading the map (which clears its own error row) keeps the note."""
    return f"{source_id} [{stage}]"


# -- rows as the pages show them ----------------------------------------------------------

# SQLite keeps whatever another tool writes into a column (text in ``year``, a BLOB in ``title``);
# every ``maps`` row read for display passes through ``display_row`` (the store's readers apply it;
# the search SQL's rows get it in search.py) so templates, citations and
# JSON see one type per column.
DISPLAY_INTEGER_COLUMNS = ("id", "year", "sheet", "width", "height")
DISPLAY_TEXT_COLUMNS = ("source_id", "source", "item_id", "title", "date", "place", "subjects", "contributors",
                        "notes", "format", "item_url", "image_url", "thumbnail_url")


def display_integer(value) -> int | None:
    """An INTEGER column's value as an int, or None when it holds anything else (text that is not
    a whole number in ASCII digits, a fraction, a BLOB)."""
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return whole_number(value, -SQLITE_MAX_INTEGER - 1, SQLITE_MAX_INTEGER)
        except NumberError:
            return None
    return None


def display_text(value) -> str | None:
    """A TEXT column's value as str or None: a BLOB decoded as UTF-8 (undecodable bytes replaced),
    a number written out."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def display_row(row: dict | None) -> dict | None:
    """A row read from ``maps`` with each known column of its declared type (other columns, such as
    a search's similarity, as they were)."""
    if row is None:
        return None
    fixed = dict(row)
    for name in DISPLAY_INTEGER_COLUMNS:
        if name in fixed:
            fixed[name] = display_integer(fixed[name])
    for name in DISPLAY_TEXT_COLUMNS:
        if name in fixed:
            fixed[name] = display_text(fixed[name])
    return fixed
