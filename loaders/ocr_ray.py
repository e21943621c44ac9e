"""The Ray engine of ``mapclip ocr`` (``--engine ray``): the OCR pass spread over a Ray cluster.

    driver: maps not yet read by this OCR model (the same resume rule) --> chunks of maps
      Ray actors (a pool, CPUs anywhere):  fetch + decode (threads) and read (one OCR engine,
                                           loaded once per actor) each map of a chunk -> outcomes
    driver: one writer, ``ocr_cli.write_outcome`` exactly as the local engine writes (each map's
            words and read mark in one transaction, load_errors rows, kept images, progress, summary)

What stays the same as the local engine (the same code wherever it can be): the run around both is
``ocr_cli.run_ocr`` (collection check, ``ocr_models`` row, which maps to read, ``loads`` row, exit
codes, summary line); each actor gets a map's pixels with ``ocr.ImageSource`` and reads them with
``ocr.OcrEngine`` through ``ocr_cli.read_one``, so failures carry the same reasons; the driver
writes each outcome with ``ocr_cli.write_outcome``.  The OCR model recorded is the one the actors
loaded (their provenance: engine version, model files by SHA-256, settings); nodes that disagree stop
the run before anything is read.

Why actors rather than tasks: the OCR models take about a second to load and ONNX Runtime's session
is reused for every map, so each actor loads them once.  Fetching stays in the actor (threads ahead
of the reader, as the local engine's): a decoded 2,048 px image is ~12 MB and a full-resolution
sheet is read as region tiles fetched while it is read, neither worth shipping through the object
store.  An actor runs two chunks at once (``max_concurrency=2``): one chunk's images are fetched while
the other's are read, the models themselves run one image at a time under a lock, so an actor holds
at most ``2 * (workers + 1)`` decoded images.  The driver keeps ``IN_FLIGHT`` chunks per actor sent.

Rate limits toward a host hold for the whole cluster, as for loads: every fetch asks the named
actor ``mapclip-host-limits`` (``ray_engine.host_limits_actor``) for its slot.  HTTP 429 for longer
than we wait (``RateLimited``) ends the run as it does locally; a rerun resumes.

Files: a map's local file, this command's kept OCR-size image (``--keep-images``) and the file a load
kept are read by the actor at the path the driver knows (one machine, or a shared file system, as
for ``load folder --engine ray``); a kept file an actor cannot see is fetched again instead.  Images
downloaded to keep are sent back and written by the driver.

Failures: an actor that dies is restarted and its pending chunks are retried on it
(``max_restarts=-1``, ``max_task_retries=-1``); a chunk that fails on the cluster otherwise becomes
load_errors rows for its maps; a driver that dies leaves whole maps only, and the rerun skips them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time

from .fetch import RateLimited
from .ocr_cli import OcrStopped, OcrSummary, Outcome, progress_bar, read_one, write_outcome
from .ray_engine import (
    NAMESPACE,
    FetchSettings,
    RayEngine,
    RayOptions,
    RayUnavailable,
    host_limits_actor,
    import_ray,
    reason_of,
    worker_fetcher,
)

__all__ = ["RayOcr", "OcrActor", "ClusterFailed", "import_ray", "LABEL", "CHUNK", "IN_FLIGHT"]

LABEL = " (ray)"  # after the command in the loads row, as the loaders' Ray engine writes it
CHUNK = 4  # maps per actor call: reading one takes ~0.5-2 s, so a call's overhead is negligible
IN_FLIGHT = 3  # chunks sent per actor: two running (fetching and reading), one waiting
ACTOR_START_TIMEOUT = 600.0


class ClusterFailed(OcrStopped):
    """An OCR actor died for good (every restart failed)."""


class OcrActor:
    """One OCR engine in a Ray actor, loaded once, with its own image source and fetch threads."""

    def __init__(self, settings, fetch: FetchSettings, limiter_actor, *, max_pixels: int, workers: int,
                 keep, threads: int | None, share: int = 1):
        import concurrent.futures

        from datasette_mapclip.runtime import limit_image_pixels

        from .ocr import ImageSource, OcrEngine, OcrUnavailable

        self.error = None
        self.engine = None
        threads = int(threads or max(1, (os.cpu_count() or 1) // max(1, share)))
        self.settings = dataclasses.replace(settings, threads=threads)
        try:
            self.engine = OcrEngine(self.settings)
        except OcrUnavailable as error:
            self.error = f"on node {os.uname().nodename}: {error}"
            return
        limit_image_pixels(max_pixels)
        self.source = ImageSource(worker_fetcher(fetch, limiter_actor), ocr_size=settings.ocr_size,
                                  max_pixels=max_pixels, keep=keep, regions=settings)
        self.workers = max(1, int(workers))
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ocr-fetch")
        self.reading = threading.Lock()  # one image at a time through the models

    def describe(self) -> dict:
        import socket

        if self.engine is None:
            return {"error": self.error}
        return {"error": None, "provenance": self.engine.provenance(), "threads": self.settings.threads,
                "host": socket.gethostname(), "pid": os.getpid()}

    def _read(self, image):
        with self.reading:
            return self.engine.read(image)

    def read_chunk(self, items) -> tuple[list[Outcome], str | None]:
        """(map, the file a load kept for it) pairs -> their outcomes in order, fetching ``workers + 1``
        ahead; and the message of a ``RateLimited`` that stopped the chunk there (its later maps
        unread, left out), else None."""
        import collections

        window, todo, outcomes = collections.deque(), iter(items), []

        def submit():
            item = next(todo, None)
            if item is not None:
                window.append(self.pool.submit(self.source.get, *item))

        for _ in range(self.workers + 1):
            submit()
        try:
            while window:
                future = window.popleft()
                submit()
                outcomes.append(read_one(self._read, future.result))
        except RateLimited as error:
            return outcomes, str(error)
        finally:
            for future in window:
                future.cancel()
        return outcomes, None


class RayOcr:
    """Connects to (or starts) Ray, holds the OCR actors of one run, and reads maps with them."""

    def __init__(self, options: RayOptions, settings, *, fetcher=None, max_pixels: int, workers: int = 2,
                 keep=None, chunk: int | None = None):
        self.options, self.settings = options, settings
        self.fetch = FetchSettings.from_fetcher(fetcher)
        self.max_pixels, self.workers, self.keep = max_pixels, workers, keep  # keep: the OCR-size KeepImages
        self.chunk = max(1, int(chunk or CHUNK))
        self.cluster_engine = RayEngine(options)  # RayUnavailable (the install hint) when Ray is missing
        self.ray = self.cluster_engine.ray
        self.actors: list = []
        self.described: dict = {}

    @property
    def provenance(self) -> dict:
        return self.described["provenance"]

    def start(self) -> RayOcr:
        """Join or start Ray, start the actors and wait until each has loaded its OCR models."""
        ray, options = self.ray, self.options
        try:
            self.cluster_engine.connect()
            cluster = self.cluster_engine.cluster()
            count = options.actors or cluster["nodes"]
            limiter = host_limits_actor(ray) if self.fetch.rules else None
            actor_class = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=2)(OcrActor)
            self.actors = [
                actor_class.options(num_cpus=options.cpus_per_actor, scheduling_strategy="SPREAD",
                                    name=f"mapclip-ocr-{os.getpid()}-{i}", namespace=NAMESPACE).remote(
                    self.settings, self.fetch, limiter, max_pixels=self.max_pixels, workers=self.workers,
                    keep=self.keep, threads=options.threads, share=math.ceil(count / cluster["nodes"]))
                for i in range(count)]
            self.cluster_engine.actors = self.actors  # stopped with the engine
            try:
                described = ray.get([actor.describe.remote() for actor in self.actors], timeout=ACTOR_START_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                raise RayUnavailable(
                    f"{count} OCR actor(s) ({options.cpus_per_actor} CPU each) did not start within "
                    f"{ACTOR_START_TIMEOUT:.0f} s: the cluster ({cluster['cpus']:.0f} CPUs) lacks the resources; "
                    "lower --actors") from None
            except ray.exceptions.RayError as error:
                raise RayUnavailable(f"the OCR actors failed to start: {reason_of(error)}") from None
            errors = [d["error"] for d in described if d["error"]]
            if errors:
                raise RayUnavailable(errors[0])
            if any(d["provenance"] != described[0]["provenance"] for d in described):
                raise RayUnavailable("the Ray nodes have different OCR models (rapidocr versions or "
                                     "model files): install the same version on every node")
        except BaseException:
            self.close()
            raise
        self.described = {**described[0], "actors": count, "cluster": cluster,
                          "hosts": sorted({d["host"] for d in described})}
        return self

    def description(self) -> str:
        d, cluster = self.described, self.described["cluster"]
        return (f"OCR in {d['actors']} Ray actor(s) ({d['threads']} threads each) on a cluster of "
                f"{cluster['nodes']} node(s), {cluster['cpus']:.0f} CPUs")

    def close(self):
        self.actors = []
        self.cluster_engine.close()  # kills the actors; shuts Ray down if this run started it

    def read_maps(self, words_store, targets, ocr_model_id: int, summary: OcrSummary, *, progress: bool = True,
                  keep=None, kept_path_of=None) -> OcrSummary:
        """``ocr_cli.read_maps`` on the cluster: ``targets`` in chunks to the actors (the least busy
        first, ``IN_FLIGHT`` chunks each at most), each chunk's outcomes written here as it comes back."""
        ray = self.ray
        started = time.perf_counter()
        chunks = iter([targets[i:i + self.chunk] for i in range(0, len(targets), self.chunk)])
        pending: dict = {}  # outcomes ref -> (its maps, actor index)
        busy = [0] * len(self.actors)

        def submit() -> bool:
            part = next(chunks, None)
            if part is None:
                return False
            index = busy.index(min(busy))
            busy[index] += 1
            items = [(target, kept_path_of(target.source_id) if kept_path_of else None) for target in part]
            pending[self.actors[index].read_chunk.remote(items)] = (part, index)
            return True

        try:
            with progress_bar(len(targets), progress) as bar:
                more = True
                while more or pending:
                    while more and len(pending) < IN_FLIGHT * len(self.actors):
                        more = submit()
                    if not pending:
                        break
                    ready, _ = ray.wait(list(pending), num_returns=1, fetch_local=True)
                    part, index = pending.pop(ready[0])
                    busy[index] -= 1
                    outcomes, stop = self._outcomes(ready[0], part)
                    for target, outcome in zip(part, outcomes):
                        write_outcome(words_store, target, outcome, ocr_model_id, summary, keep)
                        bar.update(1)
                        bar.set_postfix(words=summary.words, failed=summary.failed, refresh=False)
                    if stop:
                        raise RateLimited(stop)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # finished or gone
                    pass
            summary.seconds = time.perf_counter() - started
        return summary

    def _outcomes(self, ref, part) -> tuple[list[Outcome], str | None]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.ActorDiedError as error:  # restarts are unlimited: it is gone for good
            raise ClusterFailed(f"an OCR actor died and could not be restarted ({reason_of(error)})") from None
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, RateLimited):
                raise RateLimited(str(cause)) from None
            reason = f"OCR failed on the cluster: {reason_of(error)}"
            return [Outcome(failure=reason) for _ in part], None
