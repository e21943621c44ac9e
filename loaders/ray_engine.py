"""The Ray engine: the loaders' pipeline spread over a Ray cluster (``--engine ray``).

    driver: records --(resume check, kept-image lookup)--> chunks of records
      Ray tasks (CPUs, anywhere):   fetch + decode + preprocess a chunk   -> (what happened, pixels)
      Ray actors (GPU or CPU pool): embed the pixels of a batch           -> vectors
    driver: one writer, ``MapStore`` exactly as the local pipeline writes (one transaction a batch)

What stays the same as the local engine (it is the same code wherever it can be): the run around
both is ``load_run.run``; records come from the same sources, each chunk is prepared by the pipeline's own ``prepare``
(so the pixels are the same), the model actors run ``ClipEncoder.encode_image_tensors`` on the
same numeric path (fp16 on a GPU; int8 checked against fp32, or fp32, on a CPU), and the driver
writes through ``load_run.BatchWriter``: each map once (source ids already stored are skipped before
anything is sent), ``load_errors`` rows for failures, notes, kept images, progress bar and summary.

Why Ray core (tasks and actors) rather than Ray Data: a loc.gov search is a lazy, rate-limited
stream paged on the driver (5,600 pages for the whole map collection); Ray Data has no source for
a generator that runs on the driver, so it would need the whole list before the first image (an
hour of paging) or a new dataset, and a new model-actor pool, per window.  Here the driver feeds
tasks as records arrive, with a bounded number of batches in flight, and writes each batch as it
comes back.  bench/results/ray.md measures both on the same images.

Failures: a fetch task whose worker dies is retried by Ray (``max_retries``); a model actor that
dies is restarted and its pending batches are retried on it (``max_restarts=-1``,
``max_task_retries=-1``); a driver that dies leaves whole batches only, and the rerun skips them.

Rate limits toward a host hold for the whole cluster: every fetch asks one named actor
(``mapclip-host-limits``) for a slot before a request to that host, and sleeps on its own side
until the slot (``RateLimiter.reserve``), so no worker's count is private.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from datasette_mapclip.model.clip import ModelSpec
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.records import MapRecord

from .fetch import Fetcher, RateLimited, RateLimiter
from .kept_images import read_kept
from .load_run import LoadOptions, LoadSummary, Prepared, collect_prepared, run
from .pipeline import LOADER_NICE, prepare

INSTALL_HINT = ("The Ray engine needs Ray. Install it with: pip install 'datasette-mapclip[ray]' "
                "(or: pip install 'ray>=2.40'), then run the same command again.")
NAMESPACE = "mapclip"
LIMITER_NAME = "mapclip-host-limits"
CHUNK = 16  # records per fetch task: big enough to amortise a task, small enough to spread
ACTOR_START_TIMEOUT = 600.0


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot run the load; the message says what to do."""


class ClusterFailure(RuntimeError):
    """The cluster lost what the load cannot do without (every restart of a model actor failed)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(INSTALL_HINT) from None
    return ray


@dataclasses.dataclass
class RayOptions:
    """How the load uses the cluster.

    ``address``: a cluster to join (``ray://`` or ``host:port``); None starts or joins a local one
    (and ``RAY_ADDRESS`` is honoured).  ``actors``: model actors (None: one per GPU when the cluster
    has GPUs, else one per node).  ``gpus_per_actor``: None for automatic (1 when there are GPUs),
    0 for CPU actors.  ``threads``: torch threads per CPU actor (None: all of its node's cores,
    as the local pipeline does).  ``init``: extra ``ray.init`` arguments when this process starts Ray."""

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    threads: int | None = None
    chunk: int = CHUNK
    init: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FetchSettings:
    """What a worker needs to build the same ``Fetcher`` the command built (picklable)."""

    rules: tuple = ()  # the image limiter's (count, seconds) rules; () for no limit
    timeout: float = 30.0
    retries: int = 3
    max_retry_after: float = 120.0
    max_bytes: int | None = None
    backoff: float = 1.0

    @classmethod
    def from_fetcher(cls, fetcher: Fetcher | None) -> FetchSettings:
        if fetcher is None:
            return cls()
        rules = tuple(tuple(rule) for rule in getattr(fetcher.limiter, "rules", ()))
        return cls(rules=rules, timeout=float(fetcher.client.timeout.read or 30.0), retries=fetcher.retries,
                   max_retry_after=fetcher.max_retry_after, max_bytes=fetcher.max_bytes, backoff=fetcher.backoff)


# -- the cluster-wide rate limiter ------------------------------------------------------------

class HostLimits:
    """One ``RateLimiter`` per host, in one named actor that every worker of every load asks.

    Non-blocking: ``reserve`` books the next slot and says how long to wait for it."""

    def __init__(self):
        self.limiters: dict[str, RateLimiter] = {}

    def _limiter(self, host: str, rules) -> RateLimiter:
        rules = [tuple(rule) for rule in rules]
        limiter = self.limiters.get(host)
        if limiter is None:
            limiter = self.limiters[host] = RateLimiter(rules)
        elif [(int(c), float(s)) for c, s in rules if c] != limiter.rules:
            limiter.rules = [(int(c), float(s)) for c, s in rules if c]  # the latest load's --rate
        return limiter

    def reserve(self, host: str, rules) -> float:
        return self._limiter(host, rules).reserve()

    def pause(self, host: str, rules, seconds: float):
        self._limiter(host, rules).pause(seconds)


class ClusterLimiter:
    """What a ``Fetcher`` in a Ray worker uses as its limiter: slots from the named actor, per host."""

    def __init__(self, actor, rules):
        self.actor = actor
        self.rules = tuple(tuple(rule) for rule in rules)

    @staticmethod
    def _host(url: str) -> str:
        return urllib.parse.urlsplit(url).netloc.lower()

    def wait_for(self, url: str):
        import ray

        delay = ray.get(self.actor.reserve.remote(self._host(url), self.rules))
        if delay > 0:
            time.sleep(delay)

    def pause_for(self, url: str, seconds: float):
        import ray

        ray.get(self.actor.pause.remote(self._host(url), self.rules, seconds))

    def wait(self):
        self.wait_for("")

    def pause(self, seconds: float):
        self.pause_for("", seconds)


def host_limits_actor(ray):
    """The cluster's one limiter actor (created by the first load that needs it, then shared)."""
    actor_class = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(HostLimits)
    return actor_class.options(name=LIMITER_NAME, namespace=NAMESPACE, get_if_exists=True,
                               lifetime="detached").remote()


# -- the work on the cluster --------------------------------------------------------------------

class Preprocessor:
    """The two things ``prepare`` needs of an encoder, without the model: its input size and transform."""

    def __init__(self, image_size: int, transform):
        self.image_size = image_size
        self.transform = transform

    def preprocess(self, image):
        return self.transform(image)


_worker_state: dict = {}


def worker_fetcher(settings: FetchSettings, limiter_actor) -> Fetcher:
    """One Fetcher (one HTTP client) per worker process and fetch settings."""
    key = ("fetcher", settings)
    fetcher = _worker_state.get(key)
    if fetcher is None:
        limiter = ClusterLimiter(limiter_actor, settings.rules) if settings.rules and limiter_actor else RateLimiter([])
        fetcher = _worker_state[key] = Fetcher(limiter, timeout=settings.timeout, retries=settings.retries,
                                               max_retry_after=settings.max_retry_after,
                                               max_bytes=settings.max_bytes, backoff=settings.backoff)
    return fetcher


def _worker_pool(threads: int):
    """Niced threads (as the local pipeline's), one pool per worker process."""
    import concurrent.futures

    key = ("pool", threads)
    pool = _worker_state.get(key)
    if pool is None:
        pool = _worker_state[key] = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="mapclip-fetch", initializer=_lower_this_thread)
    return pool


def _lower_priority(tid: int):
    """This thread below the model actor: LOADER_NICE above where Ray started it (Ray runs its
    workers at nice 15, so fetch threads end at 19; the actor's threads keep 15).  Never raises a
    priority, which an absolute value would do for a root-run cluster."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + LOADER_NICE))
    except (AttributeError, OSError):
        pass


def _lower_this_thread():
    import threading

    _lower_priority(threading.get_native_id())


def _yield_whole_worker_to_the_model():
    """Lower every thread of this fetch worker process below the model, once (Linux): decoding
    must not take a core from the model's threads, which wait for each other at every layer
    (``pipeline._yield_to_the_model``).  Ray's own threads in the worker are included."""
    if _worker_state.get("niced"):
        return
    _worker_state["niced"] = True
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except (OSError, ValueError):
        return
    for tid in threads:
        _lower_priority(tid)


def warm_up() -> int:
    """Start a fetch worker (imports: torch, torchvision, Pillow) while the model actors load,
    so the first batch does not wait for it."""
    import torchvision.transforms  # noqa: F401

    from . import pipeline  # noqa: F401

    _yield_whole_worker_to_the_model()
    return os.getpid()


def prepare_chunk(items, preprocessor: Preprocessor, settings: FetchSettings, limiter_actor, *,
                  store_thumbnail: bool, max_pixels: int, keep_size: int | None, threads: int):
    """A Ray task: ``prepare`` each (record, kept bytes) with ``threads`` threads.

    Returns (Prepared list without pixels, float32 array of the good ones' pixels in order).
    RateLimited propagates (it ends the load, as in the local pipeline); every other problem is
    already a Prepared error."""
    import numpy as np

    _yield_whole_worker_to_the_model()
    fetcher = worker_fetcher(settings, limiter_actor)

    def one(item):
        record, kept_data = item
        return prepare(record, preprocessor, fetcher, store_thumbnail=store_thumbnail, max_pixels=max_pixels,
                       kept_data=kept_data, keep_size=keep_size)

    prepared = list(_worker_pool(max(1, threads)).map(one, items))
    good = [p for p in prepared if not p.error]
    size = preprocessor.image_size
    pixels = (np.stack([np.asarray(p.pixels) for p in good]).astype(np.float32, copy=False) if good
              else np.zeros((0, 3, size, size), np.float32))
    for p in prepared:
        p.pixels = None
    return prepared, pixels


class ModelActor:
    """A model in one Ray actor: loads the encoder once, embeds batches of preprocessed pixels."""

    def __init__(self, spec: dict, device: str | None, precision: str, threads: int | None,
                 checkpoint_sha256: str | None = None, checkpoint_bytes=None):
        import torch

        from datasette_mapclip.model.clip import ModelUnavailable, load_encoder
        from datasette_mapclip.runtime import prefer_hub_cache_when_offline

        self.error = None
        self.encoder = None
        try:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cpu":
                torch.set_num_threads(int(threads or os.cpu_count() or 1))
            model_spec = ModelSpec(**spec)
            if model_spec.checkpoint:
                model_spec = dataclasses.replace(model_spec, checkpoint=_local_checkpoint(
                    model_spec.checkpoint, checkpoint_sha256, checkpoint_bytes))
            if model_spec.pretrained:
                prefer_hub_cache_when_offline()
            self.encoder = load_encoder(model_spec, device=device, precision=precision)
        except ModelUnavailable as error:
            self.error = str(error)

    def describe(self) -> dict:
        import socket

        if self.encoder is None:
            return {"error": self.error}
        encoder = self.encoder
        return {"error": None, "provenance": encoder.provenance(), "precision": encoder.precision,
                "device": encoder.device, "image_size": encoder.image_size, "transform": encoder.image_transform,
                "host": socket.gethostname(), "pid": os.getpid()}

    def embed(self, *chunks):
        """The pixels of a batch (one array per fetch task) -> (unit vectors, precision used)."""
        import numpy as np
        import torch

        arrays = [chunk for chunk in chunks if len(chunk)]
        if not arrays:
            return np.zeros((0, self.encoder.dim), np.float32), self.encoder.precision
        pixels = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else np.array(arrays[0]))
        vectors = self.encoder.encode_image_tensors(pixels)
        return vectors, self.encoder.precision


def _local_checkpoint(path: str, sha256: str | None, checkpoint_bytes) -> str:
    """The checkpoint on this node: the driver's path when it holds the same file, else the bytes
    the driver shipped (a multi-node cluster), written once to a temporary file."""
    import hashlib
    import tempfile

    from datasette_mapclip.model.clip import ModelUnavailable, file_sha256

    here = Path(path).is_file()
    if here and (sha256 is None or file_sha256(path) == sha256):
        return path
    if checkpoint_bytes is None:
        if here:  # never embed with other weights than the ones the database will record
            raise ModelUnavailable(f"{path} on node {os.uname().nodename} is not the driver's checkpoint "
                                   f"(SHA-256 differs from {sha256[:12]})")
        return path  # load_encoder says it is missing
    digest = sha256 or hashlib.sha256(checkpoint_bytes).hexdigest()
    local = Path(tempfile.gettempdir()) / f"mapclip-checkpoint-{digest[:16]}{Path(path).suffix}"
    if not local.is_file():
        temporary = local.with_name(local.name + f".{os.getpid()}.tmp")
        temporary.write_bytes(checkpoint_bytes)
        os.replace(temporary, local)
    return str(local)


# -- the driver -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    chunks: list  # per fetch task: its (record, kept bytes) items
    meta_refs: list  # per fetch task: its Prepared list
    actor_index: int


class RayEngine:
    """Connects to (or starts) Ray and holds the model actors of one load."""

    def __init__(self, options: RayOptions):
        self.options = options
        self.ray = import_ray()
        self.started_ray = False
        self.actors: list = []
        self.described: dict = {}

    def connect(self):
        ray = self.ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning",
                      **self.options.init}
            try:
                if self.options.address or os.environ.get("RAY_ADDRESS"):
                    ray.init(address=self.options.address, **kwargs)
                else:
                    self._start_or_join_local(kwargs)
            except (ConnectionError, ValueError, RuntimeError) as error:
                where = self.options.address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
                raise RayUnavailable(f"cannot start or join Ray at {where}: {error}") from None
            self.started_ray = True
        return self

    def _start_or_join_local(self, kwargs: dict):
        """A Ray this run starts runs its workers at normal priority (Ray's default is nice 15), so
        that, as in the local pipeline, the model actor is at 0 and fetch workers 10 below it
        (measured: ~10% more img/s on 2 cores).  A cluster that `ray start` made here is joined
        as it is (it refuses a system config; start it with RAY_worker_niceness=0 for the same)."""
        config = {"_system_config": {"worker_niceness": 0}} if "_system_config" not in kwargs else {}
        try:
            self.ray.init(**kwargs, **config)
        except (ValueError, RuntimeError) as error:
            if not config or "system_config" not in str(error):
                raise
            self.ray.init(**kwargs)

    def cluster(self) -> dict:
        resources = self.ray.cluster_resources()
        nodes = [node for node in self.ray.nodes() if node.get("Alive")]
        return {"cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0), "nodes": max(1, len(nodes))}

    def start_actors(self, spec: ModelSpec, device: str | None, precision: str) -> dict:
        ray, options = self.ray, self.options
        cluster = self.cluster()
        gpus = options.gpus_per_actor
        if gpus is None:  # GPUs when the cluster has them, unless --device names a CPU
            wants_cpu = device is not None and not device.startswith("cuda")
            gpus = 1 if cluster["gpus"] and not wants_cpu else 0
        if gpus and not cluster["gpus"]:
            raise RayUnavailable("GPU actors were asked for but the Ray cluster has no GPUs")
        count = options.actors or (max(1, int(cluster["gpus"] // gpus)) if gpus else cluster["nodes"])
        actor_device = "cuda" if gpus else "cpu"
        checkpoint_bytes = checkpoint_sha256 = None
        spec_dict = {"architecture": spec.architecture, "pretrained": spec.pretrained, "checkpoint": spec.checkpoint}
        if spec.checkpoint:
            spec_dict["checkpoint"] = str(Path(spec.checkpoint).resolve())
            checkpoint_sha256 = spec.checkpoint_sha256() if Path(spec.checkpoint).is_file() else None
            if cluster["nodes"] > 1 and Path(spec.checkpoint).is_file():
                checkpoint_bytes = ray.put(Path(spec.checkpoint).read_bytes())  # nodes without the file
        actor_class = ray.remote(max_restarts=-1, max_task_retries=-1)(ModelActor)
        self.actors = [
            actor_class.options(num_cpus=options.cpus_per_actor, num_gpus=gpus, scheduling_strategy="SPREAD",
                                name=f"mapclip-model-{os.getpid()}-{i}", namespace=NAMESPACE).remote(
                spec_dict, actor_device, precision, options.threads, checkpoint_sha256, checkpoint_bytes)
            for i in range(count)]
        # Fetch workers start (and import) beside the actors, on the CPUs the actors leave.
        spare = int(cluster["cpus"] - (0 if gpus else count * options.cpus_per_actor))
        warming = [ray.remote(warm_up).options(num_cpus=1).remote() for _ in range(max(1, min(spare, 64)))]
        try:
            described = ray.get([actor.describe.remote() for actor in self.actors], timeout=ACTOR_START_TIMEOUT)
            ray.wait(warming, num_returns=len(warming), timeout=60)
        except ray.exceptions.GetTimeoutError:
            self.stop_actors()
            raise RayUnavailable(
                f"{count} model actor(s) ({options.cpus_per_actor} CPU, {gpus} GPU each) did not start within "
                f"{ACTOR_START_TIMEOUT:.0f} s: the cluster ({cluster['cpus']:.0f} CPUs, {cluster['gpus']:.0f} GPUs) "
                "lacks the resources; lower --actors") from None
        except ray.exceptions.RayError as error:
            self.stop_actors()
            raise RayUnavailable(f"the model actors failed to start: {error}") from None
        errors = [d["error"] for d in described if d["error"]]
        if errors:
            self.stop_actors()
            raise RayUnavailable(errors[0])
        first = described[0]
        self.described = {**first, "actors": count, "gpus_per_actor": gpus, "cluster": cluster,
                          "hosts": sorted({d["host"] for d in described})}
        if spec.checkpoint:
            self.described["provenance"] = {**first["provenance"], "checkpoint_path": spec_dict["checkpoint"]}
        return self.described

    def stop_actors(self):
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []

    def close(self):
        self.stop_actors()
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False


class RayEmbedding:
    """The Ray engine for ``load_run.run``: fetch tasks prepare chunks of records anywhere on the
    cluster, model actors embed each batch, and the driver hands batches back as they finish, with
    a bounded number in flight."""

    label = " (ray)"
    stop_errors = (ClusterFailure,)

    def __init__(self, engine: RayEngine, described: dict):
        self.engine, self.described = engine, described

    def provenance(self):
        return self.described["provenance"], self.described["precision"]

    def embed(self, records, writer, options: LoadOptions):
        engine, described, ray = self.engine, self.described, self.engine.ray
        settings = FetchSettings.from_fetcher(options.fetcher)
        limiter_actor = host_limits_actor(ray) if settings.rules else None
        preprocessor = ray.put(Preprocessor(described["image_size"], described["transform"]))
        # A whole CPU per fetch task, not a fraction.  Tried on 2 cores (bench/ray_bench.py) with
        # num_cpus=0.5: 19 img/s against 28, the first batch 5 s late, because Ray started new worker
        # processes during the load (each importing torch beside the model) instead of keeping the
        # warmed ones (it keeps about one idle worker per CPU; a cluster would see the same churn).
        # Decoding is not what limits there anyway: a 16-image chunk takes ~0.15 s of a free core.
        task = ray.remote(prepare_chunk).options(num_cpus=1, num_returns=2, max_retries=3)
        batch_size = options.batch_size
        chunk = max(1, min(engine.options.chunk, batch_size))
        chunks_per_batch = math.ceil(batch_size / chunk)
        cpus = described["cluster"]["cpus"]
        window = max(2 * len(engine.actors) + 2, math.ceil(2 * cpus / chunks_per_batch), 4)  # batches in flight
        jobs: dict = {}  # vectors ref -> _Job
        busy = [0] * len(engine.actors)
        keep_size = options.keep.size if options.keep else None

        def submit(items):
            chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
            refs = [task.remote(part, preprocessor, settings, limiter_actor, store_thumbnail=options.store_thumbnails,
                                max_pixels=options.max_pixels, keep_size=keep_size, threads=options.workers)
                    for part in chunks]
            index = busy.index(min(busy))
            busy[index] += 1
            vectors_ref = engine.actors[index].embed.remote(*[pixels for _, pixels in refs])
            jobs[vectors_ref] = _Job(chunks, [meta for meta, _ in refs], index)

        def collect(vectors_ref):
            job = jobs.pop(vectors_ref)
            busy[job.actor_index] -= 1
            prepared = _gather(ray, job)
            batch: list[Prepared] = []
            errors: list[Prepared] = []
            for p in prepared:
                collect_prepared(p, batch, errors)
            matrix = []
            if batch:
                try:
                    matrix, _precision = ray.get(vectors_ref)
                except ray.exceptions.ActorDiedError as error:  # restarts are unlimited: it is gone for good
                    raise ClusterFailure(f"a model actor died and could not be restarted ({reason_of(error)}). Run the "
                                         "same command again: it resumes where it stopped.") from None
                except ray.exceptions.RayError as error:
                    reason = f"embedding failed on the cluster: {reason_of(error)}"
                    for p in batch:
                        p.stage, p.error = "embed", reason
                    errors.extend(batch)
                    batch, matrix = [], []
            writer.write(batch, matrix, errors)

        def collect_ready(block: bool):
            if not jobs:
                return
            ready, _ = ray.wait(list(jobs), num_returns=1 if block else len(jobs), timeout=None if block else 0,
                                fetch_local=False)
            for ref in ready:
                collect(ref)

        pending: list = []
        try:
            for record in records:
                pending.append((record, read_kept(writer.kept_path(record.source_id))))
                if len(pending) >= batch_size:
                    submit(pending)
                    pending = []
                    collect_ready(block=False)
                    while len(jobs) >= window:
                        collect_ready(block=True)
            if pending:
                submit(pending)
            while jobs:
                collect_ready(block=True)
        finally:
            for vectors_ref, job in jobs.items():
                for ref in (*job.meta_refs, vectors_ref):
                    try:
                        ray.cancel(ref, force=False)
                    except Exception:  # finished or gone
                        pass


def run_ray_load(store: MapStore, spec: ModelSpec, records: Iterable[MapRecord],
                 load_options: LoadOptions | None = None, *, options: RayOptions | None = None,
                 device: str | None = None, precision: str = "auto", echo=None, **more_options) -> LoadSummary:
    """``pipeline.run_load`` on a Ray cluster: the same run (``load_run.run``), database and summary;
    ``load_options``, or keyword arguments as ``load_run.LoadOptions``.

    ``fetcher``: the command's image fetcher; workers build the same one from its settings, with
    its limiter's rules enforced cluster-wide per host.  ``workers``: threads per fetch task.
    ``echo``: called with one line describing the cluster and the model actors."""
    engine = RayEngine(options or RayOptions()).connect()
    try:
        described = engine.start_actors(spec, device, precision)
        if echo:
            cluster = described["cluster"]
            echo(f"model {described['provenance']['name']} ({described['precision']} on {described['device']}) in "
                 f"{described['actors']} Ray actor(s) on a cluster of {cluster['nodes']} node(s), "
                 f"{cluster['cpus']:.0f} CPUs, {cluster['gpus']:.0f} GPUs")
        return run(store, RayEmbedding(engine, described), records, load_options or LoadOptions(**more_options))
    finally:
        engine.close()


def _gather(ray, job: _Job) -> list[Prepared]:
    """The Prepared of every record of a batch; a chunk whose task failed becomes errors
    (RateLimited is raised: it ends the load)."""
    prepared: list[Prepared] = []
    for items, ref in zip(job.chunks, job.meta_refs):
        try:
            prepared.extend(ray.get(ref))
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, RateLimited) or isinstance(error, RateLimited):
                raise RateLimited(str(cause or error)) from None
            reason = f"fetch task failed on the cluster: {reason_of(error)}"
            prepared.extend(Prepared(record, stage="fetch", error=reason) for record, _ in items)
    return prepared


def reason_of(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
