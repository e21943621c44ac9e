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

from datasette_mapclip.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image, thumbnail_jpeg
from datasette_mapclip.model import ClipEncoder
from datasette_mapclip.records import MapRecord
from datasette_mapclip.store import MapStore

from .fetch import Fetcher, FetchError, RateLimited


@dataclasses.dataclass
class LoadSummary:
    loaded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    status: str = "finished"
    message: str = ""

    @property
    def rate(self) -> float:
        return self.loaded / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        text = (
            f"{self.status}: {self.loaded} loaded, {self.skipped} skipped (already stored), "
            f"{self.failed} failed in {self.seconds:.1f} s ({self.rate:.1f} img/s)"
        )
        if self.failed:
            text += "; see the load_errors table"
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


def prepare(record: MapRecord, encoder: ClipEncoder, fetcher: Fetcher, *, store_thumbnail: bool,
            max_pixels: int) -> Prepared:
    """Fetch, decode and preprocess one image; failures come back as data, not exceptions."""
    try:
        data = fetcher.get_bytes(record.location)
    except FetchError as error:
        return Prepared(record, stage="fetch", error=str(error))
    try:
        min_size = max(encoder.image_size, 256 if store_thumbnail else 0)
        image = open_image(data, min_size=min_size, max_pixels=max_pixels)
        pixels = encoder.preprocess(image)
        thumbnail = thumbnail_jpeg(image) if store_thumbnail else None
    except ImageDecodeError as error:
        return Prepared(record, stage="decode", error=str(error))
    except Exception as error:  # a corrupt file can raise anything from a plugin decoder
        return Prepared(record, stage="decode", error=f"{type(error).__name__}: {error}")
    return Prepared(record, pixels, thumbnail, image.size)


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
) -> LoadSummary:
    """Embed every record not already stored for this model; resumable and batch-atomic."""
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
        store.write_batch(
            model,
            [p.record for p in batch],
            matrix,
            thumbnails=[p.thumbnail for p in batch] if store_thumbnails else None,
            sizes=[p.size for p in batch],
            errors=[(p.record, p.stage, p.error) for p in errors],
        )
        summary.loaded += len(batch)
        summary.failed += len(errors)
        bar.update(len(batch) + len(errors))
        bar.set_postfix(failed=summary.failed, refresh=False)
        batch.clear()
        errors.clear()

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
                                         store_thumbnail=store_thumbnails, max_pixels=max_pixels))
            while len(in_flight) >= window or (in_flight and in_flight[0].done()):
                _collect(in_flight.popleft().result(), batch, errors)
                if len(batch) >= batch_size:
                    flush()
        while in_flight:
            _collect(in_flight.popleft().result(), batch, errors)
            if len(batch) >= batch_size:
                flush()
        flush()
    except KeyboardInterrupt:
        summary.status = "interrupted"
        summary.message = "Run the same command again to finish: stored maps are skipped, nothing is embedded twice."
    except RateLimited as error:
        summary.status = "stopped"
        summary.message = str(error)
    finally:
        for future in in_flight:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        summary.seconds = time.perf_counter() - started
        store.finish_load(load_id, summary.status, summary.loaded, summary.skipped, summary.failed)
    return summary


def _collect(prepared: Prepared, batch: list, errors: list):
    (errors if prepared.error else batch).append(prepared)
