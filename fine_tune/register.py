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

from pathlib import Path

from datasette_mapclip.store import MapStore


def register(store: MapStore, encoder, *, default: bool = False, batch_size: int = 32, workers: int = 4,
             progress: bool = True):
    """Embed every stored map with ``encoder``; returns (LoadSummary, models row, maps without location)."""
    from loaders.pipeline import run_load

    records, missing = store.stored_records()
    summary = run_load(store, encoder, records, command=f"fine-tune register {encoder.name}",
                       batch_size=batch_size, workers=workers, store_thumbnails=False, total=len(records),
                       progress=progress)
    model = store.model(encoder.name)
    if default and summary.status == "finished":
        store.set_default_model(model["name"])
        model = store.model(encoder.name)
    return summary, model, missing


def architecture_for(checkpoint: str | Path) -> str | None:
    """The architecture recorded by ``train`` beside a checkpoint (training.json), if any."""
    from .checkpoints import read_training_json

    return read_training_json(Path(checkpoint).resolve().parent).get("architecture")
