"""Put a fine-tuned model into a collection: re-embed every map with it, beside the base model.

Why re-embed: a text query must be embedded by the same model as the images it is compared
with, so a fine-tuned text tower is useless against the base model's image vectors.  Every
map is embedded again from its stored ``location`` through the loaders' own pipeline
(``loaders.pipeline.run_load``), which records the new model's provenance (architecture,
checkpoint path and SHA-256) in ``models`` and writes a new vector table; the base model's
vectors stay.  The plugin then searches whichever model a user picks (``model=<name>``), or
the default one.  Rerunning resumes: maps already embedded with this model are skipped.
Images a load kept (``--keep-images``) are read from disk, so registering never crawls the
collection's source again.
"""

from __future__ import annotations

from pathlib import Path

from datasette_mapclip.store import MapStore


def register(store: MapStore, encoder=None, *, default: bool = False, batch_size: int = 32, workers: int = 4,
             progress: bool = True, keep=None, spec=None, engine: str = "local", ray_options=None,
             device: str | None = None, precision: str = "auto", echo=None):
    """Embed every stored map with ``encoder``; returns (LoadSummary, models row, maps without location).

    Images kept by an earlier load (``--keep-images``) are read from their files, not fetched again;
    ``keep`` keeps the ones that still had to be downloaded.  ``engine="ray"`` runs the embedding
    on a Ray cluster (``loaders.ray_engine``) with the model ``spec`` loaded in its actors
    (``device``, ``precision``); ``echo`` gets its one-line description of the cluster."""
    from loaders.load_run import LoadOptions

    records, missing = store.stored_records()
    name = f"{spec.architecture}/{spec.weights_label()}" if engine == "ray" else encoder.name
    load_options = LoadOptions(command=f"fine-tune register {name}", batch_size=batch_size, workers=workers,
                               store_thumbnails=False, total=len(records), progress=progress, keep=keep)
    if engine == "ray":
        from loaders.ray_engine import run_ray_load

        summary = run_ray_load(store, spec, records, load_options, options=ray_options, device=device,
                               precision=precision, echo=echo)
    else:
        from loaders.pipeline import run_load

        summary = run_load(store, encoder, records, load_options)
    model = store.model(name)
    if default and summary.status == "finished":
        store.set_default_model(model.name)
        model = store.model(name)
    return summary, model, missing


def architecture_for(checkpoint: str | Path) -> str | None:
    """The architecture recorded by ``train`` beside a checkpoint (training.json), if any."""
    from .checkpoints import read_training_json

    return read_training_json(Path(checkpoint).resolve().parent).get("architecture")
