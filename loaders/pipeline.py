"""The local engine: fetch and decode in worker threads while the model embeds batches.

    records --(threads: fetch + decode + preprocess)--> batches --(model)--> store (one transaction a batch)

``prepare`` (one record -> pixels, thumbnail, what went wrong) is shared with the Ray engine's fetch
tasks; the run around the engine (model row, resume, progress, summary) is ``load_run.run``.

Pillow and httpx release the GIL, so a few threads keep the model fed; the window of
images in flight is bounded so memory stays flat however long the source is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Iterable

from datasette_mapclip.model.clip import ClipEncoder
from datasette_mapclip.model.images import ImageDecodeError, open_image, thumbnail_jpeg
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.records import MapRecord

from .fetch import Fetcher, FetchError
from .kept_images import keep_payload, read_kept
from .load_run import LoadOptions, LoadSummary, Prepared, collect_prepared, run


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
    # the map's own size (a JPEG is decoded at a reduced scale, near the model's input size)
    prepared = Prepared(record, pixels, thumbnail, image.info.get("full_size", image.size), keep=keep)
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


class LocalEmbedding:
    """This process's engine: fetch threads prepare records ahead of the model, which embeds them a
    batch at a time; the window of images in flight is bounded so memory stays flat."""

    label = ""
    stop_errors = ()

    def __init__(self, encoder: ClipEncoder):
        self.encoder = encoder

    def provenance(self):
        return self.encoder.provenance(), self.encoder.precision

    def embed(self, records, writer, options: LoadOptions):
        import torch

        encoder, fetcher = self.encoder, options.fetcher or Fetcher()
        batch: list[Prepared] = []
        errors: list[Prepared] = []

        def flush():
            if batch or errors:
                matrix = encoder.encode_image_tensors(torch.stack([p.pixels for p in batch])) if batch else []
                writer.write(batch, matrix, errors)
                batch.clear()
                errors.clear()

        def collect(prepared: Prepared):
            collect_prepared(prepared, batch, errors)
            if len(batch) >= options.batch_size:
                flush()

        window = max(options.workers * 4, options.batch_size * 2)
        in_flight: collections.deque = collections.deque()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="mapclip-fetch",
                                                     initializer=_yield_to_the_model)
        try:
            for record in records:
                in_flight.append(pool.submit(prepare, record, encoder, fetcher,
                                             store_thumbnail=options.store_thumbnails, max_pixels=options.max_pixels,
                                             kept_path=writer.kept_path(record.source_id),
                                             keep_size=options.keep.size if options.keep else None))
                while len(in_flight) >= window or (in_flight and in_flight[0].done()):
                    collect(in_flight.popleft().result())
            while in_flight:
                collect(in_flight.popleft().result())
            flush()
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def run_load(store: MapStore, encoder: ClipEncoder, records: Iterable[MapRecord],
             load_options: LoadOptions | None = None, **options) -> LoadSummary:
    """Embed every record not already stored for this model, in this process (``load_run.run``):
    ``load_options``, or keyword arguments as ``load_run.LoadOptions``."""
    return run(store, LocalEmbedding(encoder), records, load_options or LoadOptions(**options))
