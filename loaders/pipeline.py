"""The embedding pipeline: fetch and decode in worker threads while the model embeds batches.

    records --(threads: fetch + decode + preprocess)--> batches --(model)--> store (one transaction a batch)

Pillow and httpx release the GIL, so a few threads keep the model fed; the window of
images in flight is bounded so memory stays flat however long the source is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Iterable

from tqdm import tqdm

from datasette_mapclip.model.clip import ClipEncoder
from datasette_mapclip.model.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image, thumbnail_jpeg
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.records import LoadNote, MapRecord, note_key, storable, unsafe_url_problems

from .fetch import Fetcher, FetchError, RateLimited
from .kept_images import KeepImages, keep_payload, read_kept
from .messages import shown

# Stages of the notes a source finds again on every run (see run_load's ``notes_under``).
SOURCE_NOTE_STAGES = {"metadata", "source"}
SHOWN_PROBLEMS = 10  # bad records listed in the summary; the rest are in load_errors


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


def prepare(record: MapRecord, encoder: ClipEncoder, fetcher: Fetcher, *, store_thumbnail: bool,
            max_pixels: int, kept_path: str | None = None, kept_data: bytes | None = None,
            keep_size: int | None = None) -> Prepared:
    """Fetch, decode and preprocess one image; failures come back as data, not exceptions.

    A kept image (``kept_data``, or the file ``kept_path``) is read instead of the source; if
    it is gone or unreadable the source is fetched as usual.  ``keep_size``: keep what was
    downloaded (``Prepared.keep``; local files are never copied)."""
    if kept_data is None and kept_path:
        kept_data = read_kept(kept_path)
    if kept_data is not None:
        prepared = _decode(record, encoder, kept_data, store_thumbnail, max_pixels, None)
        if not prepared.error:
            prepared.from_kept = True
            return prepared
    try:
        data = fetcher.get_bytes(record.location)
    except FetchError as error:
        return Prepared(record, stage="fetch", error=str(error))
    downloaded = record.location.startswith(("http://", "https://"))
    return _decode(record, encoder, data, store_thumbnail, max_pixels, keep_size if downloaded else None)


def _decode(record: MapRecord, encoder, data: bytes, store_thumbnail: bool, max_pixels: int,
            keep_size: int | None) -> Prepared:
    try:
        min_size = max(encoder.image_size, 256 if store_thumbnail else 0)
        image = open_image(data, min_size=min_size, max_pixels=max_pixels)
        pixels = encoder.preprocess(image)
        thumbnail = thumbnail_jpeg(image) if store_thumbnail else None
        keep = keep_payload(data, image, keep_size) if keep_size else None
    except ImageDecodeError as error:
        return Prepared(record, stage="decode", error=str(error))
    except Exception as error:  # a corrupt file can raise anything from a plugin decoder
        return Prepared(record, stage="decode", error=f"{type(error).__name__}: {error}")
    prepared = Prepared(record, pixels, thumbnail, image.size, keep=keep)
    pages = image.info.get("pages", 1)
    if pages > 1:
        # Later pages of a TIFF are most often reduced copies (pyramidal TIFF) or scanner
        # targets, not further sheets: embed the first, and say so.
        prepared.notes.append(("pages", f"{pages} pages in the file; only the first was embedded"))
    return prepared


def _yield_to_the_model():
    """Decode threads run at a lower priority than the model's threads (Linux: per thread).

    torch's OpenMP threads wait for each other at every layer; when a decode thread takes a
    core from one of them, the other spins idle.  Niced decode threads still get the CPU the
    model leaves, and the prefetch window keeps batches ready."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (AttributeError, OSError):
        pass


LOADER_NICE = 10


def run_load(
    store: MapStore,
    encoder: ClipEncoder,
    records: Iterable[MapRecord],
    *,
    fetcher: Fetcher | None = None,
    command: str = "load",
    batch_size: int = 32,
    workers: int = 4,
    store_thumbnails: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    total: int | None = None,
    progress: bool = True,
    notes: list[LoadNote] | None = None,
    notes_under: str | None = None,
    keep: KeepImages | None = None,
) -> LoadSummary:
    """Embed every record not already stored for this model; resumable and batch-atomic.

    ``notes``: what the source found wrong besides images (it may still be filling the list
    while ``records`` is iterated); they are stored in ``load_errors`` when the run ends.
    ``notes_under``: a source that finds all its notes again on every run (a folder) names its
    path, and its earlier notes there are replaced, so fixed problems leave no stale note.
    ``keep``: write each downloaded image to this folder (``--keep-images``).  Images kept by
    any earlier load of this database are read from their files whether or not it is given."""
    import torch

    fetcher = fetcher or Fetcher()
    model = store.register_model(encoder.provenance(), precision=encoder.precision)
    done = store.embedded_source_ids(model)
    load_id = store.start_load(command, model["name"])
    summary = LoadSummary()
    started = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="embedding", disable=not progress, dynamic_ncols=True)
    batch: list[Prepared] = []
    errors: list[Prepared] = []

    def flush():
        if not batch and not errors:
            return
        matrix = encoder.encode_image_tensors(torch.stack([p.pixels for p in batch])) if batch else []
        keep_files(keep, batch)
        write_prepared(store, model, batch, matrix, errors, store_thumbnails, summary)
        bar.update(len(batch) + len(errors))
        bar.set_postfix(failed=summary.failed, refresh=False)
        batch.clear()
        errors.clear()
        store.touch_load(load_id)

    window = max(workers * 4, batch_size * 2)
    in_flight: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mapclip-fetch",
                                                 initializer=_yield_to_the_model)
    seen: set[str] = set()
    try:
        for record in records:
            if record.source_id in done or record.source_id in seen:
                summary.skipped += 1
                bar.update(1)
                continue
            seen.add(record.source_id)
            in_flight.append(pool.submit(prepare, record, encoder, fetcher,
                                         store_thumbnail=store_thumbnails, max_pixels=max_pixels,
                                         kept_path=store.kept_image_path(record.source_id),
                                         keep_size=keep.size if keep else None))
            while len(in_flight) >= window or (in_flight and in_flight[0].done()):
                collect_prepared(in_flight.popleft().result(), batch, errors)
                if len(batch) >= batch_size:
                    flush()
        while in_flight:
            collect_prepared(in_flight.popleft().result(), batch, errors)
            if len(batch) >= batch_size:
                flush()
        flush()
    except KeyboardInterrupt:
        summary.status = "interrupted"
        summary.message = "Run the same command again to finish: stored maps are skipped, nothing is embedded twice."
    except (RateLimited, KeepError) as error:
        summary.status = "stopped"
        summary.message = str(error)
    finally:
        for future in in_flight:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        write_notes(store, notes or [], summary, notes_under)
        summary.seconds = time.perf_counter() - started
        store.finish_load(load_id, summary.status, summary.loaded, summary.skipped, summary.failed)
    return summary


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


def _note_rows(prepared: list[Prepared]) -> list[tuple]:
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
        _write_rows(store, model, batch, matrix, errors, store_thumbnails)
    except Exception:  # the batch rolled back; find the record(s) that caused it
        if not batch:
            raise
        for i, prepared in enumerate(batch):
            try:
                _write_rows(store, model, [prepared], matrix[i:i + 1], [], store_thumbnails)
            except Exception as error:
                prepared.stage, prepared.error = "store", f"cannot be stored: {type(error).__name__}: {error}"
                _write_rows(store, model, [], [], [prepared], store_thumbnails)
        _write_rows(store, model, [], [], errors, store_thumbnails)
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


def _write_rows(store: MapStore, model: dict, batch: list[Prepared], matrix, errors: list[Prepared],
                store_thumbnails: bool):
    store.write_batch(
        model,
        [storable(p.record) for p in batch],
        matrix,
        thumbnails=[p.thumbnail for p in batch] if store_thumbnails else None,
        sizes=[p.size for p in batch],
        errors=[(storable(p.record), p.stage, p.error) for p in errors] + _note_rows(batch + errors),
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
