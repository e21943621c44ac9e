"""The seed's file list (``merged_files.csv`` / ``p1_map_file_list.csv``).

Columns: ``file_url, resource_url, segment_num, p1_item_id, file_count``.  ``file_url`` is a
IIIF URL ending ``full/pct:100/0/default.jpg``; rows without ``pct:`` are PDF reports.
``segment_num`` is 0-based.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasette_mapclip.model import iiif
from datasette_mapclip.store.records import SHEET_RANGE, FieldError, MapRecord, parse_whole_number

from ..messages import shown

REQUIRED_COLUMNS = ("file_url", "resource_url", "segment_num", "p1_item_id", "file_count")
_ITEM_ID = re.compile(r"/item/([^/?#]+)")


class FileListError(ValueError):
    pass


class CsvTextError(ValueError):
    """A CSV that cannot be read as text; the message says why, for a person."""


# Checked in this order: a UTF-32 LE BOM begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_csv_bytes(data: bytes, name: str) -> tuple[str, str | None]:
    """(text, note): UTF-8 (with or without BOM) and BOM-marked UTF-16/32 as they are; anything
    else read as Windows-1252 (then Latin-1), with a note saying so, because a spreadsheet
    saved "as CSV" on Windows is the usual source of such files."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), None
            except UnicodeDecodeError as error:
                raise CsvTextError(f"{name} starts with a {encoding.upper()} byte order mark but is not "
                                   f"valid {encoding.upper()} (byte {error.start}); re-save it as UTF-8") from None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        first_bad = error.start
    for encoding, label in (("cp1252", "Windows-1252 (Western European)"), ("latin-1", "Latin-1")):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        return text, (f"{name} is not UTF-8 (byte {first_bad} is not): read it as {label}; "
                      f"if names look wrong, re-save it as UTF-8")
    raise AssertionError("latin-1 decodes any bytes")


def read_csv_text(path) -> tuple[str, str | None]:
    """A CSV file's text and a note on the encoding assumed (None when it was UTF-8/16)."""
    return decode_csv_bytes(Path(path).read_bytes(), Path(path).name)


# Python csv's default field_size_limit, kept as our limit on one cell: longer is no catalogue
# value (most often a quote left open, which runs on over the lines after it).
FIELD_LIMIT = 131_072


def csv_rows(text: str, name: str, on_bad_row: Callable[[int, dict, str], None] | None = None
             ) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs of ``csv.DictReader``; a csv error (a NUL byte, say) becomes a
    CsvTextError that names the line.

    A row with a cell over ``FIELD_LIMIT`` characters is not yielded: ``on_bad_row(line, row,
    reason)`` is told (the caller records it as a load error, and the rest of the file loads);
    without ``on_bad_row`` it is a CsvTextError.  The csv module's own limit (the same number)
    would stop the reader at such a cell, and with it the whole load, so it is lifted to the
    text's length while a row is read: the text is in memory already, and no cell can be longer."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    lifted = max(FIELD_LIMIT, len(text)) + 1
    while True:
        limit = csv.field_size_limit(lifted)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            line = reader.line_num + 1  # the record that failed starts after the last line read
            raise CsvTextError(f"{name} line {line}: {error}. Nothing was written.") from None
        finally:
            csv.field_size_limit(limit)
        long = [(column, len(value)) for column, value in _cells(row) if len(value) > FIELD_LIMIT]
        if not long:
            yield reader.line_num, row
            continue
        column, length = long[0]
        reason = (f"line {reader.line_num}: the '{shown(column, 40)}' cell has {length:,} characters, more than the "
                  f"{FIELD_LIMIT:,} a catalogue cell may hold (is a quote left open?)")
        if on_bad_row is None:
            raise CsvTextError(f"{name} {reason}. Nothing was written.")
        on_bad_row(reader.line_num, row, f"{reason}; row not loaded")


def _cells(row: dict) -> Iterator[tuple[str, str]]:
    """(column, value) of a DictReader row, the cells past the header's columns included."""
    for column, value in row.items():
        if column is None:  # more cells than header columns
            yield from (("(extra cell)", extra) for extra in value or [])
        elif value is not None:
            yield column, value


def csv_header(text: str, name: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as error:
        raise CsvTextError(f"{name} line 1: {error}. Nothing was written.") from None


def item_id_from_url(url: str | None) -> str | None:
    match = _ITEM_ID.search(url or "")
    return match.group(1) if match else None


def https(url: str | None) -> str | None:
    return url.replace("http://", "https://", 1) if url and url.startswith("http://www.loc.gov") else url


@dataclass
class FileListStats:
    rows: int = 0
    pdf_reports: int = 0
    bad_rows: list = field(default_factory=list)  # (MapRecord placeholder, reason)
    encoding_note: str | None = None  # set when the file was not UTF-8 and an encoding was assumed


def read_file_list(path: str, *, size: int = iiif.DEFAULT_SIZE, stats: FileListStats | None = None) -> Iterator[MapRecord]:
    """Yield a record per image row.  PDF rows are counted in ``stats.pdf_reports``; rows
    missing values become ``stats.bad_rows`` (the loader stores them as load errors)."""
    stats = stats if stats is not None else FileListStats()
    try:
        text, stats.encoding_note = read_csv_text(path)
        fieldnames = csv_header(text, path)
        missing = [c for c in ("file_url",) if c not in fieldnames]
        if missing:
            raise FileListError(
                f"{path} is not a seed file list: no {', '.join(missing)} column. "
                f"Expected columns: {', '.join(REQUIRED_COLUMNS)}; "
                f"found: {', '.join(shown(name, 40) for name in fieldnames) or 'none'}"
            )
        def too_long(line_number, row, reason):
            stats.rows += 1
            stats.bad_rows.append((MapRecord(source_id=f"{path}:line {line_number}", location="", source="csv"),
                                   reason))

        yield from _file_list_records(csv_rows(text, path, too_long), fieldnames, path, size, stats)
    except (CsvTextError, OSError) as error:
        raise FileListError(str(error)) from None


def _file_list_records(rows, fieldnames, path, size, stats) -> Iterator[MapRecord]:
    for line_number, row in rows:
        stats.rows += 1
        file_url = (row.get("file_url") or "").strip()
        item_url = (row.get("p1_item_id") or "").strip()
        segment = (row.get("segment_num") or "").strip()
        if file_url and "pct:" not in file_url:
            stats.pdf_reports += 1
            continue
        problems = []
        if not file_url:
            problems.append("no file_url")
        elif not iiif.is_iiif_image(file_url):
            problems.append(f"file_url is not a IIIF image URL: {shown(file_url)}")
        sheet = None
        try:
            index = parse_whole_number(segment, name="segment_num", low=SHEET_RANGE[0], high=SHEET_RANGE[1] - 1)
            sheet = index + 1 if index is not None else None
        except FieldError as error:
            problems.append(str(error))
        if None in row:  # more cells than header columns
            problems.append("more cells than the header has columns")
        if any(row.get(c) is None for c in fieldnames):
            problems.append("fewer cells than the header has columns")
        source_id = iiif.canonical(file_url) if file_url else f"{path}:line {line_number}"
        record = MapRecord(
            source_id=source_id,
            location=iiif.sized(file_url, size) if file_url else "",
            source="csv",
            item_id=item_id_from_url(item_url),
            sheet=sheet,
            item_url=https(item_url) or None,
            image_url=iiif.strip_fragment(file_url) or None,
            thumbnail_url=iiif.sized(file_url, iiif.THUMBNAIL_SIZE) if file_url else None,
        )
        if problems:
            stats.bad_rows.append((record, f"line {line_number}: " + "; ".join(problems)))
            continue
        yield record
