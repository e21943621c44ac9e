"""Store a model's query encoders in the collection file (``datasette_mapclip/model/export.py``), so
the file can be searched with no torch and no weights from anywhere else.  Every command that
registers a model does it after embedding (``--no-encoders`` skips it); ``mapclip encoders add`` does
it for a file that has none."""

from __future__ import annotations

from datasette_mapclip.model.clip import ModelSpec, ModelUnavailable, load_encoder
from datasette_mapclip.model.encoders import resolve_checkpoint
from datasette_mapclip.model.export import ExportError, export_query_encoders
from datasette_mapclip.store import MapStore, read_query_encoders


def describe(rows: list[dict]) -> str:
    """One line: each part with its precision and size."""
    shown = []
    for row in rows:
        label = f"{row['part']} {row['precision']}" if row["precision"] else row["part"]
        shown.append(f"{label} {row['bytes'] / 1e6:.1f} MB")
    return ", ".join(shown)


def has_query_encoders(store: MapStore, model_name: str) -> bool:
    return len(read_query_encoders(store.conn, model_name)) == 4


def store_query_encoders(store: MapStore, encoder, *, force: bool = False, int8: bool = True) -> str:
    """Export ``encoder`` (a ClipEncoder) and store it with its model row; the line to print.
    ExportError says why a model cannot be exported."""
    name = encoder.name
    if not force and has_query_encoders(store, name):
        return f"query encoders of {name} already stored: {describe(read_query_encoders(store.conn, name))}"
    exported = export_query_encoders(encoder, int8=int8)
    store.write_query_encoders(name, exported.parts, exported.precisions, exported.check)
    check = exported.check
    cosines = ", ".join(f"{part} {value:.4f}" for part, value in check.get("int8_min_cosine", {}).items())
    checked = (f"; int8 checked on {check['texts']} texts and {check['images']} images (min cosine to open_clip "
               f"fp32: {cosines}; int8 kept where >= {check['threshold']})") if cosines else ""
    return f"query encoders of {name} stored: {describe(read_query_encoders(store.conn, name))}{checked}"


def after_embedding(store: MapStore, encoder, model_name: str, echo, *, int8: bool = True) -> None:
    """What a loader prints after storing a model's vectors: the encoders stored, or why not.
    ``encoder``: the one that embedded, if it ran here on the CPU (else a CPU copy is loaded)."""
    try:
        if encoder is None or getattr(encoder, "device", "cpu") != "cpu" or encoder.name != model_name:
            encoder = encoder_for_row(store, model_name, None)
        echo(store_query_encoders(store, encoder, int8=int8))
    except (ExportError, ModelUnavailable) as error:
        echo(f"warning: query encoders not stored ({error}); searching this model needs torch and its weights")


def encoder_for_row(store: MapStore, model_name: str | None, checkpoint: str | None):
    """A ClipEncoder for a stored model row, on the CPU at fp32: from --checkpoint (checked against the
    recorded SHA-256), this machine's checkpoint registry, or open_clip's pretrained weights."""
    row = store.model(model_name)
    config = {"checkpoints": {row.name: checkpoint}} if checkpoint else {}
    path = resolve_checkpoint(row, config)
    spec = ModelSpec(row.architecture, None if path else row.pretrained, path)
    encoder = load_encoder(spec, device="cpu", precision="fp32",
                           checkpoint_sha256=row.checkpoint_sha256 if path else None)
    if encoder.name != row.name or encoder.dim != row.dim:
        raise ModelUnavailable(f"the weights found make {encoder.name} ({encoder.dim}-d), not {row.name} ({row.dim}-d)")
    return encoder
