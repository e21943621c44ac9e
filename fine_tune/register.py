"""Put a fine-tuned model into a collection: re-embed every map with it, beside the base model.

Why re-embed: a text query must be embedded by the same model as the images it is compared
with, so a fine-tuned text tower is useless against the base model's image vectors.  Every
map is embedded again from its stored ``location`` through the loaders' own pipeline
(``loaders.pipeline.run_load``), which records the new model's provenance (architecture,
checkpoint path and SHA-256) in ``models`` and writes a new vector table; the base model's
vectors stay.  The plugin then searches whichever model a user picks (``model=<name>``), or
the default one.  Rerunning resumes: maps already embedded with this model are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasette_mapclip.records import MapRecord
from datasette_mapclip.store import MapStore

RECORD_FIELDS = ("source_id", "location", "source", "item_id", "sheet", "title", "date", "year", "place",
                 "subjects", "contributors", "notes", "format", "item_url", "image_url", "thumbnail_url")


def _json_list(value) -> list[str]:
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except ValueError:
        return [value]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def stored_records(store: MapStore) -> tuple[list[MapRecord], int]:
    """A MapRecord per ``maps`` row, rebuilt from the stored fields; (records, rows without a location)."""
    records, missing = [], 0
    for row in store.conn.execute(f"SELECT {', '.join(RECORD_FIELDS)} FROM maps ORDER BY id"):
        row = dict(row)
        if not row["location"]:
            missing += 1
            continue
        row["subjects"] = _json_list(row["subjects"])
        row["contributors"] = _json_list(row["contributors"])
        records.append(MapRecord(**row))
    return records, missing


def make_default(store: MapStore, name: str):
    """Mark one model as the collection's default (``models.is_default``), and no other."""
    with store.transaction():
        store.conn.execute("UPDATE models SET is_default = (name = ?)", (name,))


def register(store: MapStore, encoder, *, default: bool = False, batch_size: int = 32, workers: int = 4,
             progress: bool = True):
    """Embed every stored map with ``encoder``; returns (LoadSummary, models row, maps without location)."""
    from loaders.pipeline import run_load

    records, missing = stored_records(store)
    summary = run_load(store, encoder, records, command=f"fine-tune register {encoder.name}",
                       batch_size=batch_size, workers=workers, store_thumbnails=False, total=len(records),
                       progress=progress)
    model = store.model(encoder.name)
    if default and summary.status == "finished":
        make_default(store, model["name"])
        model = store.model(encoder.name)
    return summary, model, missing


def architecture_for(checkpoint: str | Path) -> str | None:
    """The architecture recorded by ``train`` beside a checkpoint (training.json), if any."""
    from .checkpoints import read_training_json

    return read_training_json(Path(checkpoint).resolve().parent).get("architecture")
