"""The seed's file list (``merged_files.csv`` / ``p1_map_file_list.csv``).

Columns: ``file_url, resource_url, segment_num, p1_item_id, file_count``.  ``file_url`` is a
IIIF URL ending ``full/pct:100/0/default.jpg``; rows without ``pct:`` are PDF reports.
``segment_num`` is 0-based.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from datasette_mapclip.records import MapRecord

from .. import iiif

REQUIRED_COLUMNS = ("file_url", "resource_url", "segment_num", "p1_item_id", "file_count")
_ITEM_ID = re.compile(r"/item/([^/?#]+)")


class FileListError(ValueError):
    pass


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


def read_file_list(path: str, *, size: int = iiif.DEFAULT_SIZE, stats: FileListStats | None = None) -> Iterator[MapRecord]:
    """Yield a record per image row.  PDF rows are counted in ``stats.pdf_reports``; rows
    missing values become ``stats.bad_rows`` (the loader stores them as load errors)."""
    stats = stats if stats is not None else FileListStats()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("file_url",) if c not in (reader.fieldnames or [])]
        if missing:
            raise FileListError(
                f"{path} is not a seed file list: no {', '.join(missing)} column. "
                f"Expected columns: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(reader.fieldnames or []) or 'none'}"
            )
        for line_number, row in enumerate(reader, start=2):
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
                problems.append(f"file_url is not a IIIF image URL: {file_url[:100]}")
            if segment and not segment.isdigit():
                problems.append(f"segment_num {segment!r} is not a number")
            if None in row:  # more cells than header columns
                problems.append("more cells than the header has columns")
            if any(row.get(c) is None for c in reader.fieldnames or []):
                problems.append("fewer cells than the header has columns")
            source_id = iiif.canonical(file_url) if file_url else f"{path}:line {line_number}"
            record = MapRecord(
                source_id=source_id,
                location=iiif.sized(file_url, size) if file_url else "",
                source="csv",
                item_id=item_id_from_url(item_url),
                sheet=int(segment) + 1 if segment.isdigit() else None,
                item_url=https(item_url) or None,
                image_url=iiif.strip_fragment(file_url) or None,
                thumbnail_url=iiif.sized(file_url, iiif.THUMBNAIL_SIZE) if file_url else None,
            )
            if problems:
                stats.bad_rows.append((record, f"line {line_number}: " + "; ".join(problems)))
                continue
            yield record
