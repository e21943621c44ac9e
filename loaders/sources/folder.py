"""A local folder of images, with an optional metadata CSV beside them."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from datasette_mapclip.records import MapRecord

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".webp"}
METADATA_COLUMNS = (
    "file", "item_id", "sheet", "title", "date", "year", "place", "subjects", "contributors",
    "notes", "format", "item_url", "image_url",
)
LIST_SEPARATOR = ";"


class MetadataError(ValueError):
    pass


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively), in a stable order; hidden files skipped."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def read_metadata(csv_path: Path) -> dict[str, dict]:
    """``file`` (path relative to the folder) -> catalogue fields.  Unknown columns are ignored."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise MetadataError(
                f"{csv_path} needs a 'file' column (the image path relative to the folder); "
                f"it has: {', '.join(reader.fieldnames or []) or 'no header'}. "
                f"Optional columns: {', '.join(METADATA_COLUMNS[1:])}"
            )
        return {row["file"].strip(): row for row in reader if row.get("file")}


def _clean(value):
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _list(value) -> list[str]:
    return [part.strip() for part in (value or "").split(LIST_SEPARATOR) if part.strip()]


def folder_records(folder: str | Path, metadata_csv: str | Path | None = None) -> Iterator[MapRecord]:
    """A record per image; ``location`` is absolute, so re-embedding works from any directory."""
    folder = Path(folder).resolve()
    if metadata_csv is None and (folder / "metadata.csv").exists():
        metadata_csv = folder / "metadata.csv"
    metadata = read_metadata(Path(metadata_csv)) if metadata_csv else {}
    for path in image_files(folder):
        relative = path.relative_to(folder).as_posix()
        row = metadata.get(relative, {})
        year = _clean(row.get("year"))
        sheet = _clean(row.get("sheet"))
        yield MapRecord(
            source_id=relative,
            location=str(path),
            source="folder",
            item_id=_clean(row.get("item_id")) or relative,
            sheet=int(sheet) if sheet and sheet.isdigit() else None,
            title=_clean(row.get("title")) or path.stem.replace("_", " "),
            date=_clean(row.get("date")),
            year=int(year) if year and year.lstrip("-").isdigit() else None,
            place=_clean(row.get("place")),
            subjects=_list(row.get("subjects")),
            contributors=_list(row.get("contributors")),
            notes=_clean(row.get("notes")),
            format=_clean(row.get("format")),
            item_url=_clean(row.get("item_url")),
            image_url=_clean(row.get("image_url")),
        )
