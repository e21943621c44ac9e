"""One load run, whichever engine embeds: the lifecycle both engines share.

    register the model -> skip what is stored -> start a ``loads`` row
      -> the engine fetches, decodes and embeds batches; each comes back through ``BatchWriter``
         (kept images written, one transaction a batch, progress bar, liveness)
      -> interrupted or stopped: a message saying how to resume
      -> the source's notes, the summary, the ``loads`` row finished

An engine (``pipeline.LocalEmbedding``, ``ray_engine.RayEmbedding``) differs only in how batches are
fetched, embedded and handed back; ``LoadOptions`` holds what a loader command asks of any run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from tqdm import tqdm

from datasette_mapclip.model.images import DEFAULT_MAX_PIXELS
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.records import LoadNote, MapRecord, note_key, storable, unsafe_url_problems

from .fetch import Fetcher, RateLimited
from .kept_images import KeepImages
from .messages import shown

# Stages of the notes a source finds again on every run (see run_load's ``notes_under``).
SOURCE_NOTE_STAGES = {"metadata", "source"}


SHOWN_PROBLEMS = 10  # bad records listed in the summary; the rest are in load_errors

RESUME_MESSAGE = "Run the same command again to finish: stored maps are skipped, nothing is embedded twice."


@dataclasses.dataclass
class LoadOptions:
    """What a loader command asks of a run, whichever engine runs it.

    ``notes``: what the source found wrong besides images (it may still be filling the list
    while the records are iterated); they are stored in ``load_errors`` when the run ends.
    ``notes_under``: a source that finds all its notes again on every run (a folder) names its
    path, and its earlier notes there are replaced, so fixed problems leave no stale note.
    ``keep``: write each downloaded image to this folder (``--keep-images``).  Images kept by
    any earlier load of this database are read from their files whether or not it is given."""

    fetcher: Fetcher | None = None
    command: str = "load"
    batch_size: int = 32
    workers: int = 4  # fetch threads (per fetch task on Ray)
    store_thumbnails: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    total: int | None = None
    progress: bool = True
    notes: list[LoadNote] | None = None
    notes_under: str | None = None
    keep: KeepImages | None = None


@dataclasses.dataclass
class LoadSummary:
    loaded: int = 0
    skipped: int = 0
    failed: int = 0
    noted: int = 0  # notes (NULLed values, unsafe links, extra pages...) on maps or files
    seconds: float = 0.0
    status: str = "finished"
    message: str = ""
    problems: list = dataclasses.field(default_factory=list)  # "key (stage): reason", the first few
    kept: int = 0  # images written to the --keep-images folder
    from_kept: int = 0  # images read from kept files instead of their source
    model: str = ""  # the models row the vectors went to

    @property
    def rate(self) -> float:
        return self.loaded / self.seconds if self.seconds else 0.0

    def add_problem(self, key: str, stage: str, reason: str):
        if len(self.problems) < SHOWN_PROBLEMS:
            label = key if key.endswith(f"[{stage}]") else f"{key} ({stage})"
            self.problems.append(f"{shown(label, None)}: {shown(reason, None)}")  # file names and cells

    def line(self) -> str:
        notes = f", {self.noted} notes" if self.noted else ""
        text = (
            f"{self.status}: {self.loaded} loaded, {self.skipped} skipped (already stored), "
            f"{self.failed} failed{notes} in {self.seconds:.1f} s ({self.rate:.1f} img/s)"
        )
        if self.failed or self.noted:
            text += "; see the load_errors table"
        if self.from_kept or self.kept:
            text += f"; {self.from_kept} read from kept images, {self.kept} newly kept"
        for problem in self.problems:
            text += f"\n  {problem}"
        hidden = self.failed + self.noted - len(self.problems)
        if self.problems and hidden > 0:
            text += f"\n  ... and {hidden} more in load_errors"
        if self.message:
            text += f"\n{self.message}"
        return text


@dataclasses.dataclass
class Prepared:
    record: MapRecord
    pixels: object = None  # torch tensor
    thumbnail: bytes | None = None
    size: tuple | None = None
    stage: str | None = None
    error: str | None = None
    notes: list = dataclasses.field(default_factory=list)  # (stage, reason) to tell the publisher
    keep: tuple | None = None  # (bytes, extension) to write to the keep folder
    kept: object = None  # KeptFile once written
    from_kept: bool = False  # read from a kept file, not from record.location


class KeepError(Exception):
    """A kept image could not be written (disk full, permissions): stop, so nothing is left
    un-kept that a later re-embedding would have to fetch again."""


def keep_files(keep: KeepImages | None, batch: list[Prepared]):
    """Write the downloaded images of a batch to the keep folder, before the batch is committed
    (a file without its row is found again by its name; a row never points at a missing file)."""
    if keep is None:
        return
    for prepared in batch:
        if prepared.keep is None:
            continue
        try:
            prepared.kept = keep.write(prepared.record.source_id, prepared.keep)
        except OSError as error:
            raise KeepError(f"cannot write a kept image under {keep.root}: {error.strerror or error}. "
                            "Free some space or choose another --keep-images folder, then run the same "
                            "command again: it resumes where it stopped.") from None
        prepared.keep = None


def collect_prepared(prepared: Prepared, batch: list, errors: list):
    unsafe = unsafe_url_problems(prepared.record)
    if unsafe:
        prepared.notes.append(("links", "; ".join(unsafe)))
    (errors if prepared.error else batch).append(prepared)


def note_rows(prepared: list[Prepared]) -> list[tuple]:
    """load_errors rows for the notes of prepared maps, keyed apart from the maps' own errors."""
    rows = []
    for p in prepared:
        record = storable(p.record)
        rows.extend((dataclasses.replace(record, source_id=note_key(record.source_id, stage)), stage, reason)
                    for stage, reason in p.notes)
    return rows


def write_prepared(store: MapStore, model: dict, batch: list[Prepared], matrix, errors: list[Prepared],
           store_thumbnails: bool, summary: LoadSummary):
    """One transaction for the batch; if it fails, map by map, so one bad record (a value SQLite
    refuses) becomes a load error instead of sinking the batch and the run."""
    try:
        write_rows(store, model, batch, matrix, errors, store_thumbnails)
    except Exception:  # the batch rolled back; find the record(s) that caused it
        if not batch:
            raise
        for i, prepared in enumerate(batch):
            try:
                write_rows(store, model, [prepared], matrix[i:i + 1], [], store_thumbnails)
            except Exception as error:
                prepared.stage, prepared.error = "store", f"cannot be stored: {type(error).__name__}: {error}"
                write_rows(store, model, [], [], [prepared], store_thumbnails)
        write_rows(store, model, [], [], errors, store_thumbnails)
        stored = [p for p in batch if not p.error]
        errors.extend(p for p in batch if p.error)
        batch[:] = stored
    summary.loaded += len(batch)
    summary.kept += sum(1 for p in batch if p.kept)
    summary.from_kept += sum(1 for p in batch if p.from_kept)
    summary.failed += len(errors)
    summary.noted += sum(len(p.notes) for p in batch + errors)
    for prepared in errors:
        summary.add_problem(storable(prepared.record).source_id, prepared.stage, prepared.error)
    for prepared in batch + errors:
        for stage, reason in prepared.notes:
            summary.add_problem(note_key(storable(prepared.record).source_id, stage), stage, reason)


def write_rows(store: MapStore, model: dict, batch: list[Prepared], matrix, errors: list[Prepared],
                store_thumbnails: bool):
    store.write_batch(
        model,
        [storable(p.record) for p in batch],
        matrix,
        thumbnails=[p.thumbnail for p in batch] if store_thumbnails else None,
        sizes=[p.size for p in batch],
        errors=[(storable(p.record), p.stage, p.error) for p in errors] + note_rows(batch + errors),
        kept=[(p.record.source_id, p.kept.root, p.kept.path, p.kept.size) for p in batch if p.kept],
    )


def write_notes(store: MapStore, notes: list[LoadNote], summary: LoadSummary, notes_under: str | None):
    """The source's notes (metadata values left out, skipped links...), in one transaction."""
    if not notes and not notes_under:
        return
    with store.transaction():
        if notes_under:
            store.clear_notes({note.stage for note in notes} | SOURCE_NOTE_STAGES, notes_under)
        for note in notes:
            store.record_note(note)
    summary.noted += len(notes)
    for note in notes:
        summary.add_problem(note.key, note.stage, note.reason)


class BatchWriter:
    """Where an engine hands each embedded batch: kept images first, then one transaction, then the
    progress bar and the run's liveness mark."""

    def __init__(self, store: MapStore, model: dict, options: LoadOptions, summary: LoadSummary, bar, load_id: int):
        self.store, self.model, self.options, self.summary, self.bar, self.load_id = \
            store, model, options, summary, bar, load_id

    def kept_path(self, source_id: str) -> str | None:
        """A file an earlier load kept for this record (read instead of fetching it again)."""
        return self.store.kept_image_path(source_id)

    def write(self, batch: list[Prepared], matrix, errors: list[Prepared]):
        keep_files(self.options.keep, batch)
        write_prepared(self.store, self.model, batch, matrix, errors, self.options.store_thumbnails, self.summary)
        self.bar.update(len(batch) + len(errors))
        self.bar.set_postfix(failed=self.summary.failed, refresh=False)
        self.store.touch_load(self.load_id)


class Embedding(Protocol):
    """How an engine fetches, embeds and hands back batches."""

    label: str  # added to the command in ``loads`` and to the progress bar: "" or " (ray)"
    stop_errors: tuple  # errors that end the run with a message (status "stopped")

    def provenance(self) -> tuple[dict, str]: ...  # (the model's provenance, its precision)

    def embed(self, records: Iterator[MapRecord], writer: BatchWriter, options: LoadOptions) -> None: ...


def run(store: MapStore, embedding: Embedding, records: Iterable[MapRecord], options: LoadOptions) -> LoadSummary:
    """Embed every record not already stored for this model; resumable and batch-atomic."""
    provenance, precision = embedding.provenance()
    model = store.register_model(provenance, precision=precision)
    done = store.embedded_source_ids(model)
    load_id = store.start_load(options.command + embedding.label, model.name)
    summary = LoadSummary(model=model.name)
    started = time.perf_counter()
    bar = tqdm(total=options.total, unit="img", desc="embedding" + embedding.label, disable=not options.progress,
               dynamic_ncols=True)
    seen: set[str] = set()

    def to_embed() -> Iterator[MapRecord]:
        for record in records:
            if record.source_id in done or record.source_id in seen:
                summary.skipped += 1
                bar.update(1)
                continue
            seen.add(record.source_id)
            yield record

    try:
        embedding.embed(to_embed(), BatchWriter(store, model, options, summary, bar, load_id), options)
    except KeyboardInterrupt:
        summary.status = "interrupted"
        summary.message = RESUME_MESSAGE
    except (RateLimited, KeepError, *embedding.stop_errors) as error:
        summary.status = "stopped"
        summary.message = str(error)
    finally:
        bar.close()
        write_notes(store, options.notes or [], summary, options.notes_under)
        summary.seconds = time.perf_counter() - started
        store.finish_load(load_id, summary.status, summary.loaded, summary.skipped, summary.failed)
    return summary
