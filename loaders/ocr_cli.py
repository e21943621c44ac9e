"""``mapclip ocr DB``: read the words printed on every map of a collection into ``map_words``.

Resumable: a map read by the same OCR model (engine, weights, settings) is skipped, also when it
had no text; a map that fails becomes a ``load_errors`` row of stage ``ocr`` and is tried again on
the next run.  Images are fetched and decoded in worker threads while this thread reads; with
``--engine ray`` they are fetched and read by OCR actors on a Ray cluster (``ocr_ray.py``) and this
process writes what they send back, through the same ``write_outcome``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
import time
from dataclasses import dataclass

import click

from datasette_mapclip.cli import open_store
from datasette_mapclip.model.images import DEFAULT_MAX_PIXELS
from datasette_mapclip.runtime import limit_image_pixels

from .fetch import SAFETY_MARGIN, RateLimited
from .messages import shown
from .ocr import DEFAULT_OCR_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE, OcrSettings, OcrUnavailable, ReadError


class OcrStopped(Exception):
    """The run cannot go on (the message says why); what was written stays written."""


class KeepFailed(OcrStopped):
    """An image could not be written to the --keep-images folder: stop, with the reason."""


@dataclass
class OcrSummary:
    read: int = 0
    words: int = 0
    no_text: int = 0
    failed: int = 0
    skipped: int = 0
    from_kept: int = 0
    kept: int = 0
    seconds: float = 0.0
    reading_seconds: float = 0.0

    def line(self) -> str:
        rate = self.read / self.seconds if self.seconds else 0.0
        text = (f"read {self.read} maps in {self.seconds:.1f} s ({rate:.2f} maps/s): {self.words} words, "
                f"{self.no_text} with no text, {self.failed} failed, {self.skipped} already read")
        if self.from_kept or self.kept:
            text += f"; {self.from_kept} read from kept images, {self.kept} newly kept"
        return text


@dataclass
class Outcome:
    """What reading one map came to, wherever it was read (this process or a Ray actor): its words,
    the size of the image read, the seconds reading took, where the pixels came from and what to
    keep; or ``failure``, the map's load_errors reason."""

    words: list | None = None
    size: tuple[int, int] | None = None
    seconds: float = 0.0
    from_kept: bool = False
    keep: tuple[bytes, str] | None = None
    failure: str | None = None


def read_one(read, get) -> Outcome:
    """Get one map's image (``get()``: ``Fetched``) and ``read`` it.  A ``ReadError`` or the engine
    failing on it is a failure outcome; ``RateLimited`` and ``KeyboardInterrupt`` propagate."""
    try:
        fetched = get()
        read_started = time.perf_counter()
        found = read(fetched.image)
        reading = time.perf_counter() - read_started
    except ReadError as error:
        return Outcome(failure=str(error))
    except (RateLimited, KeyboardInterrupt):
        raise
    except Exception as error:  # the engine failed on this image: a row, and the run goes on
        return Outcome(failure=f"OCR failed: {type(error).__name__}: {error}")
    return Outcome(found, tuple(fetched.image.size), reading, bool(fetched.from_kept), fetched.keep)


def write_outcome(words_store, target, outcome: Outcome, ocr_model_id: int, summary: OcrSummary, keep=None):
    """One map's outcome into the collection: its words and read mark in one transaction (and its
    downloaded image kept), or its load_errors row.  ``KeepFailed`` when the kept image cannot be written."""
    from datasette_mapclip.store.words import WordsNotStorable, ocr_error_key

    from .ocr import write_kept

    if outcome.failure is not None:
        words_store.record_failure(target, outcome.failure)
        summary.failed += 1
        return
    if outcome.keep and keep:
        try:
            write_kept(keep, target.source_id, outcome.keep)
        except OSError as error:
            raise KeepFailed(f"cannot write a kept image under {keep.root}: {error.strerror or error}") from None
        summary.kept += 1
    summary.from_kept += int(outcome.from_kept)
    try:
        count = words_store.write_reading(target.id, ocr_model_id, outcome.words, size=outcome.size,
                                          seconds=round(outcome.seconds, 3), error_key=ocr_error_key(target.source_id))
    except WordsNotStorable as error:  # nothing was written: the map's row says why, the run goes on
        words_store.record_failure(target, str(error))
        summary.failed += 1
        return
    summary.read += 1
    summary.words += count
    summary.no_text += int(count == 0)
    summary.reading_seconds += outcome.seconds


def progress_bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="map", desc="reading words", disable=not progress, dynamic_ncols=True)


def read_maps(words_store, engine, source, targets, ocr_model_id: int, summary: OcrSummary, *, workers: int = 2,
              progress: bool = True, keep=None, kept_path_of=None):
    """Read ``targets`` (``MapToRead``) in order: fetch and decode in ``workers`` threads (a small
    window ahead), OCR here, then each map's words and mark in one transaction.  Failures are
    recorded and the run goes on; ``RateLimited`` and ``KeyboardInterrupt`` stop it (what was
    written stays written)."""
    started = time.perf_counter()
    window = collections.deque()
    todo = iter(targets)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ocr-fetch")

    def submit():
        target = next(todo, None)
        if target is not None:
            kept = kept_path_of(target.source_id) if kept_path_of else None
            window.append((target, pool.submit(source.get, target, kept)))

    try:
        with progress_bar(len(targets), progress) as bar:
            for _ in range(workers + 1):
                submit()
            while window:
                target, future = window.popleft()
                submit()
                write_outcome(words_store, target, read_one(engine.read, future.result), ocr_model_id, summary, keep)
                bar.update(1)
                bar.set_postfix(words=summary.words, failed=summary.failed, refresh=False)
    finally:
        for _, future in window:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.perf_counter() - started
    return summary


@click.command("ocr")
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.option("--ocr-size", type=click.IntRange(min=256), default=DEFAULT_OCR_SIZE, show_default=True,
              help="Read IIIF images (loc.gov) as derivatives of this many px on the long side. Local files are "
                   "read at full resolution, other URLs as served.")
@click.option("--limit", type=click.IntRange(min=1), help="Read at most this many maps this run.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds per HTTP request.")
@click.option("--rate", type=click.FloatRange(min=0), default=200, show_default=True,
              help="Image requests per minute, evenly spaced, less our "
                   f"{SAFETY_MARGIN:.0%} margin (loc.gov allows 200). 0: unlimited.")
@click.option("--keep-images", "keep_images", type=click.Path(file_okay=False),
              help="Keep each downloaded OCR-size image in DIR/ocr-<size>/ (a 2,048 px JPEG is ~0.5-1 MB), so "
                   "a rerun with other settings reads it from there. Images a load kept in the kept_images "
                   "table are read instead of the network when they are at least this size.")
@click.option("--tile", type=click.IntRange(min=128), default=DEFAULT_TILE, show_default=True,
              help="Read images larger than this in tiles of at most TILE x TILE px (and of at most 2,048 / "
                   "--detect-scale px, so that the text detector never sees more than 2,048 px a side).")
@click.option("--overlap", type=click.IntRange(min=0), default=DEFAULT_OVERLAP, show_default=True,
              help="Px neighbouring tiles share: a word up to this long cut by a tile edge is read whole "
                   "in the next tile.")
@click.option("--detect-scale", type=click.FloatRange(0.25, 4), default=OcrSettings.detect_scale, show_default=True,
              help="How much larger the text detector sees each tile: 1.5 takes about 2.2 times as long and reads "
                   "about as many names (docs/ocr.md).")
@click.option("--full-resolution", is_flag=True,
              help="Read IIIF sheets larger than --ocr-size at full resolution instead, tile by tile (one IIIF "
                   "region request per --tile x --tile px tile, at --rate): small lettering on large sheets. "
                   "Sheets over --max-pixels are refused; region tiles are not kept.")
@click.option("--turned", is_flag=True,
              help="Also read every tile turned 90 degrees and keep the best reading of each place "
                   "(twice the time; see bench/results/ocr.md for what it adds).")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for the OCR models (default: all cores; --engine ray: per actor, default its "
                   "node's cores shared by the actors there).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads fetching and decoding images ahead of the reader (--engine ray: in each actor).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels (decompression bombs, 30,000 px sheets).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: fetch threads and the OCR models in this process. ray: fetch and read in a pool of "
                   "OCR actors on a Ray cluster (each loads the models once), writing to the same database "
                   "here; --rate holds for the whole cluster. Needs: pip install 'datasette-mapclip[ray]'.")
@click.option("--ray-address",
              help="Ray cluster to join (--engine ray), e.g. 'auto' (the cluster `ray start` made on this "
                   "machine), 'head-node:6379' or 'ray://head-node:10001'. Default: $RAY_ADDRESS, else a "
                   "running local cluster, else a new local Ray for this run.")
@click.option("--actors", type=click.IntRange(min=1),
              help="OCR actors (--engine ray). Default: one per node, each using its node's cores (or --threads).")
def ocr(db_path, ocr_size, limit, timeout, rate, keep_images, tile, overlap, detect_scale, full_resolution, turned, threads,
        workers, max_pixels, quiet, engine, ray_address, actors):
    """Read the words printed on each map of DB_PATH (OCR: RapidOCR's PP-OCRv6 models on ONNX
    Runtime) into the map_words table, with their boxes, searchable through map_words_fts.

    Rerunning skips maps already read with the same settings; other settings read them again and
    replace their words.

    Example: mapclip ocr maps.db --limit 100 (on a Ray cluster: --engine ray --ray-address auto)
    """
    from .fetch import Fetcher, per_minute

    try:
        settings = OcrSettings(ocr_size=ocr_size, tile=tile, overlap=overlap, rotations=(0, 90) if turned else (0,),
                               full_resolution=full_resolution, detect_scale=detect_scale,
                               threads=threads or os.cpu_count())
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--overlap")
    ray = ray_options(ray_address, actors, threads) if engine == "ray" else None
    fetcher = Fetcher(per_minute(rate), timeout=timeout)
    try:
        exit_code = run_ocr(db_path, settings, fetcher=fetcher, keep_images=keep_images, limit=limit,
                            workers=workers, max_pixels=max_pixels, progress=not quiet, ray=ray)
    finally:
        fetcher.close()
    if exit_code:
        sys.exit(exit_code)


def check_ocr_available():
    """ClickException (one line: what to install) when the OCR models cannot be used here."""
    from .ocr import import_rapidocr

    try:
        import_rapidocr()
    except OcrUnavailable as error:
        raise click.ClickException(str(error))


def ray_options(address=None, actors=None, threads=None):
    """How ``--engine ray`` uses the cluster (the loaders' Ray engine's options, ``RayOptions``)."""
    from .ray_engine import RayOptions

    return RayOptions(address=address, actors=actors, threads=threads)


def run_ocr(db_path, settings: OcrSettings, *, fetcher, keep_images=None, limit=None, workers: int = 2,
            max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, echo=None, ray=None) -> int:
    """The OCR pass over a collection, as `mapclip ocr` runs it and the loaders' --ocr after their load:
    the maps not yet read by this OCR model, a ``loads`` row for the run, a summary line.  Returns the
    exit code (0 finished, 2 rate-limited, 1 a kept image could not be written or the cluster lost
    its actors, 130 interrupted); ClickException for what stops it before it starts.

    ``ray``: ``RayOptions`` to fetch and read on a Ray cluster (``ocr_ray.py``) instead of here;
    ``settings.threads`` is then ignored for ``ray.threads`` (None: each actor's node decides)."""
    from datasette_mapclip.store import StoreError, open_collection_readonly
    from datasette_mapclip.store.words import WordStore

    from .ocr import ImageSource, OcrEngine, keep_ocr_images

    echo = echo or (lambda line: click.echo(line, err=True))
    try:
        open_collection_readonly(db_path).close()  # never create a schema in a file that is not a collection
    except StoreError as error:
        raise click.ClickException(str(error))
    if ray is not None:
        from . import ocr_ray
        from .ray_engine import RayUnavailable

        try:
            ocr_ray.import_ray()  # the one-line advice before anything starts
        except RayUnavailable as error:
            raise click.ClickException(str(error))
    keep = None
    if keep_images:
        keep = keep_ocr_images(keep_images, settings.ocr_size)
        try:
            keep.check_writable()
        except OSError as error:
            raise click.ClickException(f"cannot write to --keep-images {keep_images}: {error.strerror or error}")
    if ray is None:
        try:
            engine = OcrEngine(settings)
        except OcrUnavailable as error:
            raise click.ClickException(str(error))
        provenance, label = engine.provenance(), ""
    else:
        try:
            engine = ocr_ray.RayOcr(ray, settings, fetcher=fetcher, max_pixels=max_pixels, workers=workers,
                                    keep=keep).start()
        except RayUnavailable as error:
            raise click.ClickException(str(error))
        echo(engine.description())
        provenance, label = engine.provenance, ocr_ray.LABEL
    try:
        limit_image_pixels(max_pixels)
        store = open_store(db_path)
        words = WordStore(store)
        model = words.register_ocr_model(provenance)
        targets, done = words.maps_to_read(model.id, limit)
        summary = OcrSummary(skipped=done)
        echo(f"OCR {model.name}: {len(targets)} maps to read, {done} already read, database {db_path}")
        load_id = store.start_load(f"ocr {db_path}{label}", model.name)
        status, exit_code, message = "finished", 0, None
        try:
            if ray is None:
                source = ImageSource(fetcher, ocr_size=settings.ocr_size, max_pixels=max_pixels, keep=keep,
                                     regions=settings)
                read_maps(words, engine, source, targets, model.id, summary, workers=workers, progress=progress,
                          keep=keep, kept_path_of=store.kept_image_path)
            else:
                engine.read_maps(words, targets, model.id, summary, progress=progress, keep=keep,
                                 kept_path_of=store.kept_image_path)
        except RateLimited as error:
            status, exit_code, message = "stopped", 2, shown(str(error), None)
        except OcrStopped as error:
            status, exit_code, message = "stopped", 1, f"Error: {error}. Rerun the same command to continue."
        except KeyboardInterrupt:
            status, exit_code, message = "interrupted", 130, "interrupted: rerun the same command to continue"
        except BaseException:
            status = "failed"
            raise
        finally:
            store.finish_load(load_id, status, summary.read, summary.skipped, summary.failed)
            store.close()
    finally:
        if ray is not None:
            engine.close()
    echo(summary.line())
    if message:
        echo(message)
    return exit_code
