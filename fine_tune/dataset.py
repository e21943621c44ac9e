"""Image-caption pairs from a mapclip database, split into train / validation / test by item.

Why by item: the sheets of one atlas or Sanborn volume share a catalogue record and look
alike; if some landed in training and others in the test split, the test would reward
memorising the atlas.  Whole items go to one split, chosen by a seeded shuffle, so the same
seed and database always give the same split.

The output is plain CSV (map_id, item_id, image, caption) that any other tool can read, plus
``dataset.json`` recording where it came from.
"""

from __future__ import annotations

import csv
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasette_mapclip.store import StoreError, read_kept_paths_readonly, read_maps_readonly

from .captions import TEMPLATES, render_caption, resolve_template

SPLITS = ("train", "validation", "test")
CSV_COLUMNS = ("map_id", "item_id", "image", "caption")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 0


class DatasetError(ValueError):
    """The database or dataset folder cannot be used; the message says why."""


@dataclass
class Pair:
    map_id: int
    item_id: str
    image: str
    caption: str


@dataclass
class DatasetSummary:
    counts: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)
    skipped_no_location: int = 0
    from_kept: int = 0  # pairs whose image is a kept file (--keep-images), not the source

    def line(self) -> str:
        parts = [f"{split} {self.counts.get(split, 0)} maps / {self.items.get(split, 0)} items" for split in SPLITS]
        text = "; ".join(parts)
        if self.skipped_no_location:
            text += f"; {self.skipped_no_location} maps skipped (no stored image location)"
        if self.from_kept:
            text += f"; {self.from_kept} images from kept files"
        return text


def read_maps(db_path: str | Path) -> list[dict]:
    """Every ``maps`` row's caption fields and image location (read-only).  Where a load kept the
    image (``--keep-images``) and the file is still there, ``location`` is that file: training and
    evaluation then read it from disk instead of fetching it again."""
    try:
        rows = read_maps_readonly(db_path, ("id", "source_id", "item_id", "title", "date", "place", "subjects",
                                            "notes", "format", "location"))
        kept = read_kept_paths_readonly(db_path)
    except StoreError as error:
        raise DatasetError(str(error)) from None
    for row in rows:
        path = kept.get(row["source_id"])
        row["from_kept"] = bool(path and Path(path).is_file())
        if row["from_kept"]:
            row["location"] = path
    return rows


def check_fractions(fractions) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(f"split fractions must be three non-negative numbers adding up to 1, got {fractions}")
    return fractions


def split_by_item(pairs: list[Pair], fractions=DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED) -> dict[str, list[Pair]]:
    """Assign whole items to splits so each split holds about its fraction of the *maps*.

    Items are shuffled with ``seed`` (sorted first, so row order in the database does not
    matter), then filled into train, validation, test in turn by cumulative map count."""
    fractions = check_fractions(fractions)
    by_item: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_item.setdefault(pair.item_id, []).append(pair)
    items = sorted(by_item)
    order = np.random.default_rng(seed).permutation(len(items))
    total = len(pairs)
    bounds = np.cumsum(fractions) * total
    splits: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    placed = 0
    for index in order:
        group = by_item[items[index]]
        # The split whose share the middle of this item falls into.
        middle = placed + len(group) / 2
        split = SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), 2)]
        splits[split].extend(group)
        placed += len(group)
    for split in SPLITS:
        splits[split].sort(key=lambda pair: pair.map_id)
    return splits


def build_pairs(rows: list[dict], template: str) -> tuple[list[Pair], int]:
    """(pairs, number of maps skipped because no image location is stored)."""
    pairs, skipped = [], 0
    for row in rows:
        if not row.get("location"):
            skipped += 1
            continue
        item_id = row.get("item_id") or f"map-{row['id']}"
        pairs.append(Pair(int(row["id"]), str(item_id), str(row["location"]), render_caption(row, template)))
    return pairs, skipped


def write_split(path: Path, pairs: list[Pair]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for pair in pairs:
            writer.writerow([pair.map_id, pair.item_id, pair.image, pair.caption])


def read_split(dataset_dir: str | Path, split: str) -> list[Pair]:
    """The pairs of one split written by ``build_dataset`` (or any CSV with those columns)."""
    path = Path(dataset_dir) / f"{split}.csv"
    if not path.is_file():
        raise DatasetError(f"no {path}; build it with: mapclip fine-tune dataset DB {dataset_dir}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path} lacks columns {', '.join(missing)} (needs {', '.join(CSV_COLUMNS)})")
        return [Pair(int(r["map_id"]), r["item_id"], r["image"], r["caption"]) for r in reader]


def read_description(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def build_dataset(db_path: str | Path, out_dir: str | Path, *, template: str | None = None,
                  fractions=DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED) -> DatasetSummary:
    """Write OUT_DIR/{train,validation,test}.csv and OUT_DIR/dataset.json from DB's maps."""
    template_text = resolve_template(template)
    fractions = check_fractions(fractions)
    rows = read_maps(db_path)
    pairs, skipped = build_pairs(rows, template_text)
    if not pairs:
        raise DatasetError(f"{db_path} has no maps with a stored image location to build pairs from")
    splits = split_by_item(pairs, fractions, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = DatasetSummary(skipped_no_location=skipped, from_kept=sum(1 for row in rows if row.get("from_kept")))
    for split, split_pairs in splits.items():
        write_split(out_dir / f"{split}.csv", split_pairs)
        summary.counts[split] = len(split_pairs)
        summary.items[split] = len({p.item_id for p in split_pairs})
    description = {
        "source_db": str(Path(db_path).resolve()),
        "template": template_text,
        "template_name": next((name for name, text in TEMPLATES.items() if text == template_text), None),
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "counts": summary.counts,
        "items": summary.items,
        "skipped_no_location": skipped,
        "images_from_kept_files": summary.from_kept,
        "columns": list(CSV_COLUMNS),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return summary
