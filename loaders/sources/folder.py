"""A local folder of images, with an optional metadata CSV beside them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasette_mapclip.store.records import (
    SHEET_RANGE,
    YEAR_RANGE,
    FieldError,
    LoadNote,
    MapRecord,
    displayable,
    note_key,
    parse_whole_number,
)

from ..messages import shown
from .file_list import CsvTextError, csv_header, csv_rows, read_csv_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".webp"}
METADATA_COLUMNS = (
    "file", "item_id", "sheet", "title", "date", "year", "place", "subjects", "contributors",
    "notes", "format", "item_url", "image_url",
)
LIST_SEPARATOR = ";"


class MetadataError(ValueError):
    pass


@dataclass
class FolderReport:
    """What a folder source tells the publisher besides its records."""

    notes: list[LoadNote] = field(default_factory=list)
    root: str | None = None  # the folder, resolved: where its notes' locations lie
    skipped_links: list[tuple[str, str]] = field(default_factory=list)  # (name in the folder, why)
    encoding_note: str | None = None
    warnings: list[str] = field(default_factory=list)  # one line each, for the terminal


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def image_files(folder: Path, *, follow_symlinks: bool = False, skipped_links: list | None = None) -> list[Path]:
    """Every image under ``folder`` (recursively), in a stable order; hidden files skipped.

    Symbolic links that lead outside ``folder`` are followed only with ``follow_symlinks``
    (publishing a folder must not publish whatever a link points at); the ones skipped, and
    broken ones, are appended to ``skipped_links``.  Linked directories inside the folder are
    walked under their own path only, so no image is found twice and no loop is walked."""
    folder = Path(folder).resolve()
    skipped = skipped_links if skipped_links is not None else []
    found: list[Path] = []
    walked: set[Path] = set()

    def skip(path: Path, why: str):
        skipped.append((displayable(path.relative_to(folder).as_posix()), why))

    def walk(directory: Path):
        real = directory.resolve()
        if real in walked:
            return
        walked.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            skip(directory, f"cannot be read: {error.strerror or error}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            if entry.is_symlink():
                target = path.resolve()
                if not target.exists():
                    skip(path, "broken symbolic link")
                    continue
                inside = _is_inside(target, folder)
                if not inside and not follow_symlinks:
                    skip(path, "symbolic link leading outside the folder; --follow-symlinks loads it")
                    continue
                if inside and target.is_dir():
                    continue  # walked under its own name
            if entry.is_dir():
                walk(path)
            elif entry.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)

    walk(folder)
    return sorted(found)


def read_metadata(csv_path: Path, report: FolderReport | None = None,
                  bad_rows: list[tuple[int, dict, str]] | None = None) -> dict[str, tuple[int, dict]]:
    """``file`` (path relative to the folder) -> (CSV line, catalogue fields).  Unknown columns are
    ignored.  The encoding assumed for a non-UTF-8 file goes to ``report.encoding_note``.

    A row that cannot be a catalogue row (a cell over ``FIELD_LIMIT`` characters) goes to
    ``bad_rows`` as (line, row, reason) and the rest is read; an empty file is no metadata, with
    a warning in ``report.warnings``.  A file that is no catalogue at all (no ``file`` column,
    not CSV) is a MetadataError."""
    report = report if report is not None else FolderReport()
    bad_rows = bad_rows if bad_rows is not None else []
    try:
        text, encoding_note = read_csv_text(csv_path)
        if not text.strip():
            report.warnings.append(f"{shown(csv_path, None)} is empty: the images load without catalogue fields")
            return {}
        fieldnames = csv_header(text, str(csv_path))
        if "file" not in fieldnames:
            raise MetadataError(
                f"{csv_path} needs a 'file' column (the image path relative to the folder); "
                f"it has: {', '.join(shown(name, 40) for name in fieldnames) or 'no header'}. "
                f"Optional columns: {', '.join(METADATA_COLUMNS[1:])}"
            )
        rows = {row["file"].strip(): (line, row)
                for line, row in csv_rows(text, str(csv_path), lambda *bad: bad_rows.append(bad))
                if row.get("file")}
    except CsvTextError as error:
        raise MetadataError(str(error)) from None
    except OSError as error:
        raise MetadataError(f"cannot read {csv_path}: {error.strerror or error}") from None
    report.encoding_note = encoding_note
    return rows


def _clean(value):
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _list(value) -> list[str]:
    return [part.strip() for part in (value or "").split(LIST_SEPARATOR) if part.strip()]


def _number(row: dict, name: str, value_range: tuple[int, int], problems: list[str]) -> int | None:
    """A whole-number column, or None with the reason added to ``problems`` (one bad cell
    must not cost the map, nor SQLite's 64-bit INTEGER overflow sink its batch)."""
    try:
        return parse_whole_number(row.get(name), name=name, low=value_range[0], high=value_range[1])
    except FieldError as error:
        problems.append(f"{error}: ignored")
        return None


def folder_records(folder: str | Path, metadata_csv: str | Path | None = None, *,
                   follow_symlinks: bool = False, report: FolderReport | None = None) -> Iterator[MapRecord]:
    """A record per image; ``location`` is absolute (the store records it relative to the collection
    file's folder where it lies inside it: ``store/locations.py``), so re-embedding works from any
    directory.

    A file name that is not UTF-8 keeps its real path in ``location`` (for reading) and gets a
    displayable, stable ``source_id`` (``map_\\xff.jpg``); a catalogue value that cannot be
    stored is left out (NULL; a year then comes from the date) with a note in ``report.notes``."""
    report = report if report is not None else FolderReport()
    folder = Path(folder).resolve()
    report.root = str(folder)
    if metadata_csv is None and (folder / "metadata.csv").exists():
        metadata_csv = folder / "metadata.csv"
    bad_rows: list[tuple[int, dict, str]] = []
    metadata = read_metadata(Path(metadata_csv), report, bad_rows) if metadata_csv else {}
    csv_name = Path(metadata_csv).name if metadata_csv else None
    for line, row, reason in bad_rows:  # its image (if any) loads without the row's fields
        file = (row.get("file") or "").strip()
        if file and len(file) <= 4096:
            key, location = note_key(displayable(file), "metadata"), str(folder / file)
        else:
            key, location = f"{csv_name} line {line} [metadata]", str(metadata_csv)
        report.notes.append(LoadNote(key, "metadata", f"{csv_name} {reason}", location=displayable(location),
                                     source="folder"))
    for path in image_files(folder, follow_symlinks=follow_symlinks, skipped_links=report.skipped_links):
        relative = path.relative_to(folder).as_posix()
        name = displayable(relative)
        line, row = metadata.get(relative) or metadata.get(name) or (None, {})
        problems: list[str] = []
        record = MapRecord(
            source_id=name,
            location=str(path),
            source="folder",
            item_id=_clean(row.get("item_id")) or name,
            sheet=_number(row, "sheet", SHEET_RANGE, problems),
            title=_clean(row.get("title")) or displayable(path.stem).replace("_", " "),
            date=_clean(row.get("date")),
            year=_number(row, "year", YEAR_RANGE, problems),
            place=_clean(row.get("place")),
            subjects=_list(row.get("subjects")),
            contributors=_list(row.get("contributors")),
            notes=_clean(row.get("notes")),
            format=_clean(row.get("format")),
            item_url=_clean(row.get("item_url")),
            image_url=_clean(row.get("image_url")),
        )
        if problems:
            report.notes.append(LoadNote(note_key(name, "metadata"), "metadata",
                                         f"{csv_name} line {line}: " + "; ".join(problems),
                                         location=displayable(str(path)), source="folder"))
        yield record
