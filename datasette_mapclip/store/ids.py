"""The one parser of whole numbers that come from a request: map ids (``like``, ``more``, ``fewer``,
``term=map:<id>``, the thumbnail and map-page paths) and the search's other integers (``k``, ``page``,
``year_min``, ``year_max``).

ASCII digits only: ``str.isdigit`` accepts "²" (which ``int`` refuses) and ``int`` accepts other
scripts' digits ("١٢") and underscores ("1_000"), so neither decides what a number is.  The length is
checked before ``int`` runs (a 5,000-digit string costs time and, past Python's 4,300-digit limit,
raises), and a map id fits SQLite's 64-bit integer.
"""

from __future__ import annotations

import re

MAX_ID = 2**63 - 1  # SQLite's largest integer
MAX_CHARS = 25  # longer than any number in range, with a sign and leading zeros to spare
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")


class NumberError(ValueError):
    """Why a text is not a number in range; ``str()`` completes "<name> must be ..."."""


class NotWholeNumber(NumberError):
    pass


class OutOfRange(NumberError):
    pass


def whole_number(text: str, low: int, high: int) -> int:
    """``text`` (surrounding whitespace ignored) as an int in [low, high]; NumberError otherwise."""
    text = text.strip() if isinstance(text, str) else ""
    if len(text) > MAX_CHARS:
        raise NotWholeNumber(f"a whole number, got {len(text)} characters")
    if not _WHOLE_NUMBER.fullmatch(text):
        raise NotWholeNumber(f"a whole number, got {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise OutOfRange(f"between {low} and {high}, got {value}")
    return value


def map_id(text: str) -> int:
    """A map id as a URL gives it (0 to SQLite's largest integer); NumberError otherwise."""
    return whole_number(text, 0, MAX_ID)


def map_id_or_none(text: str) -> int | None:
    """A path segment as a map id, or None when it cannot name one (the route answers 404)."""
    try:
        return map_id(text)
    except NumberError:
        return None


def declared_length(header: str) -> int | None:
    """A Content-Length header's value, or None when it is not a plain number (the body is
    counted as it arrives either way): "²" passes ``str.isdigit`` but not ``int``."""
    try:
        return whole_number(header, 0, MAX_ID)
    except NumberError:
        return None
