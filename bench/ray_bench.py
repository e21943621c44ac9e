#!/usr/bin/env python
"""The Ray engine against the local pipeline on this machine: ViT-B-32 on the same 2000 px JPEGs.

Phases (each in its own subprocess, interleaved for ``--rounds`` rounds):

  local      ``run_load`` as ``mapclip load folder`` runs it (batch 32, 4 decode threads, thumbnails,
             precision auto = int8 on a CPU)
  ray        ``run_ray_load`` (``--engine ray``) on a local Ray started for the run with every core:
             fetch+decode as Ray tasks, one model actor, the driver writing the same database
  ray-data   for comparison, the same work written with Ray Data (``map_batches`` over tasks, then a
             callable-class actor pool, ``iter_batches`` back to one writer): what the engine would
             cost had it been built on Ray Data (needs ``pip install 'ray[data]'``; skipped without)
  cosine     the vectors the ray phase stored against the local phase's (same numeric path)

Memory is the peak, over the run, of the summed PSS (proportional set size: shared pages such as
Ray's object store and the model's weights counted once) of the phase's process and every process
it started (Ray's GCS, raylet, workers and actors), sampled every second (a sample reads /proc; more often, it slows what it measures).  "Others' CPU" is the
share of the machine used by processes outside that tree while the phase ran.

    .venv/bin/python bench/ray_bench.py                 # 320 images, 2 rounds (~6 min on 2 cores)
    .venv/bin/python bench/ray_bench.py --images 160 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

import loader_bench as lb  # noqa: E402 - the loader benchmark's inputs and helpers

RESULT_MARK = "BENCH-RESULT "
GOAL_RATIO = 0.8
MAPS_LOC = 562_842
MAPS_ARCHIVE = 5_000_000


# -- measuring a process tree -------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, from /proc (Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick


def _proc_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) bytes of a process from /proc/<pid>/smaps_rollup; (0, 0) if it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def tree(root: int) -> list[int]:
    """A process and all its descendants (Ray's GCS, raylet, workers, actors)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat:
                children.setdefault(stat[0], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class TreeMeter:
    """Peak summed PSS and CPU seconds of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.peak_pss = 0
        self.peak_rss = 0
        self.cpu: dict[int, tuple[float, float]] = {}  # pid -> (first, last) cpu seconds
        self._stop = threading.Event()

    def _sample(self):
        pss = rss = 0
        for pid in tree(os.getpid()):
            stat = _proc_stat(pid)
            if stat is None:
                continue
            memory = _proc_memory(pid)
            pss, rss = pss + memory[0], rss + memory[1]
            first = self.cpu.get(pid, (stat[1], stat[1]))[0]
            self.cpu[pid] = (first, stat[1])
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._machine0 = lb._machine_cpu_seconds()
        self._wall0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop sampling (call before the tree is shut down, so its CPU is counted)."""
        if not self._stop.is_set():
            self._sample()
            self._stop.set()
            self._thread.join()
            busy1, steal1 = lb._machine_cpu_seconds()
            busy0, steal0 = self._machine0
            own = sum(last - first for first, last in self.cpu.values())
            capacity = (time.perf_counter() - self._wall0) * os.cpu_count()
            self.other_load = (max(0.0, (busy1 - busy0) - own) + (steal1 - steal0)) / capacity if capacity else 0.0

    def __exit__(self, *exc):
        self.stop()


def timed_store(db_path):
    """A MapStore whose write_batch records when each batch committed (for the steady rate)."""
    from datasette_mapclip.store import MapStore

    store = MapStore(db_path)
    commits = []
    write_batch = store.write_batch

    def timed(model, records, *args, **kwargs):
        result = write_batch(model, records, *args, **kwargs)
        commits.append((time.perf_counter(), len(records)))
        return result

    store.write_batch = timed
    return store, commits


def steady_rate(commits) -> float | None:
    if len(commits) < 3:
        return None
    return sum(n for _, n in commits[1:]) / (commits[-1][0] - commits[0][0])


def save_vectors(store, path):
    import numpy as np

    ids, matrix = store.vectors()
    source_ids = dict(store.conn.execute("SELECT id, source_id FROM maps"))
    np.savez(path, source_ids=np.array([source_ids[i] for i in ids]), matrix=matrix)


# -- phases ------------------------------------------------------------------------------------

def phase_local(params: dict) -> dict:
    from loaders.pipeline import run_load

    started = time.perf_counter()
    with TreeMeter() as meter:
        encoder = lb.load(params, "auto")
        ready = time.perf_counter()
        store, commits = timed_store(params["db"])
        summary = run_load(store, encoder, lb.records(params), batch_size=params["batch_size"],
                           workers=params["workers"], store_thumbnails=True, progress=False)
    return finish(params, store, summary, commits, meter, started, ready, precision=encoder.precision)


def phase_ray(params: dict) -> dict:
    from datasette_mapclip.model.clip import ModelSpec
    from loaders.ray_engine import RayOptions, run_ray_load

    started = time.perf_counter()
    ready = {}
    with TreeMeter() as meter:
        store, commits = timed_store(params["db"])
        options = RayOptions(threads=params["threads"], init={"num_cpus": os.cpu_count(),
                                                              "object_store_memory": params["object_store"]})
        summary = run_ray_load(store, ModelSpec(lb.ARCHITECTURE, None, params["checkpoint"]), lb.records(params),
                               options=options, batch_size=params["batch_size"], workers=params["workers"],
                               store_thumbnails=True, progress=False,
                               echo=lambda line: ready.setdefault("at", time.perf_counter()))
    # (the last CPU sample of Ray's processes is at most one interval before run_ray_load shut them down)
    return finish(params, store, summary, commits, meter, started, ready["at"], precision=store.model()["precision"])


def phase_ray_data(params: dict) -> dict:
    """The same load on Ray Data, for the comparison in the results (not a product path)."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        return {"skipped": f"Ray Data is not installed ({error}); pip install 'ray[data]'"}
    import numpy as np
    import torch

    from datasette_mapclip.model.clip import import_open_clip
    from datasette_mapclip.model.images import DEFAULT_MAX_PIXELS
    from loaders.fetch import Fetcher
    from loaders.load_run import LoadSummary
    from loaders.pipeline import prepare
    from loaders.ray_engine import Preprocessor, _yield_whole_worker_to_the_model

    started = time.perf_counter()
    recs = lb.records(params)
    checkpoint, threads = params["checkpoint"], params["threads"]
    with TreeMeter() as meter:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="warning",
                 object_store_memory=params["object_store"])
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        transform = import_open_clip().image_transform(224, is_train=False)
        preprocessor = Preprocessor(224, transform)

        def prep(batch):
            _yield_whole_worker_to_the_model()
            fetcher = Fetcher()
            out = [prepare(recs[i], preprocessor, fetcher, store_thumbnail=True, max_pixels=DEFAULT_MAX_PIXELS)
                   for i in batch["index"]]
            return {"index": batch["index"], "pixels": np.stack([np.asarray(p.pixels) for p in out]),
                    "thumbnail": np.array([p.thumbnail for p in out], dtype=object),
                    "width": np.array([p.size[0] for p in out]), "height": np.array([p.size[1] for p in out])}

        class Embed:
            def __init__(self):
                from datasette_mapclip.model.clip import ModelSpec, load_encoder

                torch.set_num_threads(threads or os.cpu_count())
                self.encoder = load_encoder(ModelSpec(lb.ARCHITECTURE, None, checkpoint), precision="auto")

            def __call__(self, batch):
                vectors = self.encoder.encode_image_tensors(torch.from_numpy(batch.pop("pixels")))
                return {**batch, "vector": vectors}

        dataset = (ray.data.from_items([{"index": i} for i in range(len(recs))])
                   .map_batches(prep, batch_size=16, num_cpus=1)
                   .map_batches(Embed, batch_size=params["batch_size"], concurrency=1, num_cpus=1))
        from datasette_mapclip.model.clip import ModelSpec

        spec = ModelSpec(lb.ARCHITECTURE, None, checkpoint)
        provenance = {"name": f"{spec.architecture}/{spec.weights_label()}", "architecture": spec.architecture,
                      "checkpoint_path": checkpoint, "dim": 512, "image_size": 224}
        store, commits = timed_store(params["db"])
        model = store.register_model(provenance, precision="int8")
        ready = time.perf_counter()
        summary = LoadSummary()
        for batch in dataset.iter_batches(batch_size=params["batch_size"], batch_format="numpy"):
            batch_records = [recs[int(i)] for i in batch["index"]]
            store.write_batch(model, batch_records, batch["vector"], thumbnails=list(batch["thumbnail"]),
                              sizes=list(zip(batch["width"].tolist(), batch["height"].tolist())))
            summary.loaded += len(batch_records)
        summary.seconds = time.perf_counter() - ready
        meter.stop()
        ray.shutdown()
    return finish(params, store, summary, commits, meter, started, ready, precision="int8")


def finish(params, store, summary, commits, meter, started, ready, *, precision) -> dict:
    if summary.failed or summary.status != "finished" or summary.loaded != len(params["images"]):
        raise RuntimeError(summary.line())
    if params.get("vectors"):
        save_vectors(store, params["vectors"])
    store.close()
    end = time.perf_counter()
    # img/s ends at the last commit, as the report defines it: what follows (saving the vectors for
    # the cosine check, and for Ray the shutdown of the Ray the load started, ~1.4 s) is not loading,
    # and is counted in the end-to-end rate instead.
    last_commit = commits[-1][0] if commits else end
    return {"images": summary.loaded, "rate": summary.loaded / (last_commit - ready), "steady_rate": steady_rate(commits),
            "end_to_end_rate": summary.loaded / (end - started), "startup_seconds": ready - started,
            "other_load": meter.other_load, "peak_pss_mb": meter.peak_pss / 2**20,
            "peak_rss_sum_mb": meter.peak_rss / 2**20, "precision": precision}


def phase_cosine(params: dict) -> dict:
    import numpy as np

    a, b = np.load(params["a"]), np.load(params["b"])
    index = {s: i for i, s in enumerate(a["source_ids"])}
    order = [index[s] for s in b["source_ids"]]
    cosines = (a["matrix"][order] * b["matrix"]).sum(axis=1)
    return {"images": len(order), "min": float(cosines.min()), "mean": float(cosines.mean())}


PHASES = {"local": phase_local, "ray": phase_ray, "ray-data": phase_ray_data, "cosine": phase_cosine}


def child_main(name: str, params: dict):
    import warnings

    warnings.filterwarnings("ignore", message="No pretrained weights")
    result = PHASES[name](params)
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_phase(name: str, params: dict, quiet_wait: float, pause_file: str | None = None) -> dict:
    while pause_file and Path(pause_file).exists():  # someone else is timing something: wait
        time.sleep(10)
    if quiet_wait:
        lb.wait_for_quiet(quiet_wait)
    process = subprocess.run([sys.executable, __file__, "--phase", name, "--params", json.dumps(params)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode or not lines:
        sys.stderr.write(process.stdout)
        raise SystemExit(f"phase {name} failed (exit {process.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    if "rate" in result:
        lb.log(f"{name}: {result['rate']:.1f} img/s after start-up, steady {_fmt(result['steady_rate'])}, "
               f"start-up {result['startup_seconds']:.1f} s, peak PSS {result['peak_pss_mb']:.0f} MB, "
               f"others {result['other_load']:.0%}")
    else:
        lb.log(f"{name}: {result}")
    return result


# -- report ------------------------------------------------------------------------------------

def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def best(results):
    return max(results, key=lambda r: r["rate"])


def hours(count: int, rate: float) -> str:
    value = count / rate / 3600
    return f"{value:,.1f}" if value >= 1 else f"{value:.2f} ({value * 60:.0f} min)"


def report(args, runs: dict, command: str) -> str:
    local, ray_run = best(runs["local"]), best(runs["ray"])
    ray_data = [r for r in runs["ray-data"] if "rate" in r]
    ratio = ray_run["rate"] / local["rate"]
    steady = (ray_run["steady_rate"] or 0) / (local["steady_rate"] or 1)
    rows = []
    for name, results, notes in (
            ("local pipeline", runs["local"], "threads decode, model in-process"),
            ("ray engine", runs["ray"], "Ray core: fetch tasks + 1 model actor, writer on the driver"),
            *([("Ray Data (comparison)", ray_data, "map_batches tasks + actor pool, iter_batches writer; its "
                "actor loads the model lazily, inside img/s")]
              if ray_data else [])):
        top = best(results)
        rounds = ", ".join(f"{r['rate']:.1f} ({r['other_load']:.0%})" for r in results)
        rows.append(f"| {name} | {top['rate']:.1f} | {_fmt(top['steady_rate'])} | {top['end_to_end_rate']:.1f} "
                    f"| {top['startup_seconds']:.1f} | {rounds} | {max(r['peak_pss_mb'] for r in results):.0f} "
                    f"| {max(r['peak_rss_sum_mb'] for r in results):.0f} | {top['precision']} | {notes} |")
    skipped = [r["skipped"] for r in runs["ray-data"] if "skipped" in r]
    cpu_rate = ray_run["rate"]
    lines = [
        "# Ray engine benchmark", "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {lb.machine()}",
        f"- model: {lb.ARCHITECTURE}, seeded random weights from a checkpoint; precision auto (int8 on a CPU)",
        f"- inputs: {args.images} synthetic scanned-map JPEGs, {lb.IMAGE_SIZE[0]}x{lb.IMAGE_SIZE[1]}, "
        f"quality {lb.JPEG_QUALITY} (the loader benchmark's), batch {args.batch_size}, {args.workers} decode threads, "
        "thumbnails on",
        f"- command: `{command}`", "",
        f"Each phase ran {args.rounds} time(s), interleaved, each in a fresh process; the best round counts. "
        "**img/s** is from the moment the model is ready (the model load for local, Ray's start plus the actors' "
        "model load for Ray: both in **start-up s**) to the last commit; **steady** is between the first and last "
        "committed batch; **end to end** includes start-up. Memory: peak summed PSS of the phase's whole process "
        "tree (shared pages counted once), and the summed RSS (shared pages counted in every process).", "",
        "| engine | img/s | steady img/s | end to end img/s | start-up s | rounds: img/s (others' CPU) "
        "| peak PSS MB | peak RSS sum MB | precision | what |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---|",
        *rows, "",
        "| goal | measured | target | result |", "|---|---:|---:|---|",
        f"| ray engine / local pipeline, img/s (the engine's overhead on one small machine) | {ratio:.2f}x "
        f"| >= {GOAL_RATIO}x | {'PASS' if ratio >= GOAL_RATIO else 'FAIL'} |",
        f"| (steady img/s ratio, informative) | {steady:.2f}x | | |",
        f"| min cosine, ray vs local vectors (same int8 path) | {runs['cosine']['min']:.6f} | >= 0.9999 "
        f"| {'PASS' if runs['cosine']['min'] >= 0.9999 else 'FAIL'} |",
    ]
    if skipped:
        lines += ["", f"Ray Data phase skipped: {skipped[0]}"]
    if ray_data:
        rd = best(ray_data)
        lines += ["", f"Ray Data on the same work: {rd['rate']:.1f} img/s ({rd['rate'] / local['rate']:.2f}x local), "
                  f"steady {_fmt(rd['steady_rate'])}, peak PSS {rd['peak_pss_mb']:.0f} MB. The engine is built on "
                  "Ray core for the reasons in `loaders/ray_engine.py` (a lazy, rate-limited loc.gov search paged on "
                  "the driver has no Ray Data source; one model-actor pool for the whole load), not for speed."]
    lines += [
        "", "## Expected hours", "",
        f"From the rates above (CPU rows: measured here, {os.cpu_count()} cores, `ray engine` img/s) and, for GPUs, "
        "the prepared `bench/gpu_bench.py` (not run: no GPU was lent to this session; the GPU rows use its goal, "
        "2,500 img/s end to end on one H100, which clip-retrieval reports on an A100, until it is measured). "
        "N machines or GPUs scale the model work linearly as long as there are CPU cores to decode for them "
        "(~16 per GPU). A loc.gov crawl is bounded by loc.gov instead: 200 images/minute for the whole cluster "
        "(`--rate`), 46.9 hours for 562,842 maps whatever the hardware, which is why `--keep-images` exists.", "",
        f"| hardware | img/s | {MAPS_LOC:,} maps | {MAPS_ARCHIVE:,} images |", "|---|---:|---:|---:|",
        f"| this machine, {os.cpu_count()} CPU cores (measured) | {cpu_rate:.1f} | {hours(MAPS_LOC, cpu_rate)} h "
        f"| {hours(MAPS_ARCHIVE, cpu_rate)} h |",
        f"| 16 CPU cores (x{16 / os.cpu_count():g}, linear estimate) | {cpu_rate * 16 / os.cpu_count():.0f} "
        f"| {hours(MAPS_LOC, cpu_rate * 16 / os.cpu_count())} h | {hours(MAPS_ARCHIVE, cpu_rate * 16 / os.cpu_count())} h |",
        f"| 1 GPU (H100/A100, fp16, 16 decode cores; goal, not measured) | 2,500 | {hours(MAPS_LOC, 2500)} h "
        f"| {hours(MAPS_ARCHIVE, 2500)} h |",
        f"| 4 GPUs | 10,000 | {hours(MAPS_LOC, 10000)} h | {hours(MAPS_ARCHIVE, 10000)} h |",
        f"| 8 GPUs | 20,000 | {hours(MAPS_LOC, 20000)} h | {hours(MAPS_ARCHIVE, 20000)} h |",
        f"| N GPUs | 2,500 N | {MAPS_LOC / 2500 / 3600:.3f} / N h | {MAPS_ARCHIVE / 2500 / 3600:.2f} / N h |",
        f"| any hardware, fetching from loc.gov at 200/min | 3.3 | {hours(MAPS_LOC, 200 / 60)} h "
        f"| {hours(MAPS_ARCHIVE, 200 / 60)} h |",
        "", "## GPU", "",
        "`bench/gpu_bench.py` is ready for a machine with CUDA (see bench/README.md); it was **not run**: this "
        "session was lent no GPU (device status: not drawn). It measures ViT-B-32 fp16 model-only img/s and the "
        "Ray engine end to end (Ray fetch tasks decoding 512 px JPEG derivatives on the CPU cores, one fp16 model "
        "actor on the GPU) and writes bench/results/gpu.md.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="images per phase (default 320)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch (CLI default 32)")
    parser.add_argument("--workers", type=int, default=4, help="decode threads (CLI default 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--object-store-mb", type=int, default=1024, help="Ray object store for the run (MB)")
    parser.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data comparison")
    parser.add_argument("--quiet-wait", type=float, default=20, help="wait up to s for a quiet machine per phase")
    parser.add_argument("--pause-file", help="before each phase, wait while this file exists (a shared machine)")
    parser.add_argument("--cache-dir", default=str(BENCH_DIR / ".cache"), help="synthetic maps and checkpoint")
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "ray.md"))
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return child_main(args.phase, json.loads(args.params))
    command = shlex.join([os.path.relpath(sys.executable, REPO_ROOT), os.path.relpath(__file__, REPO_ROOT),
                          *sys.argv[1:]])
    cache = Path(args.cache_dir)
    images = lb.ensure_images(cache / f"maps-{lb.IMAGE_SIZE[0]}x{lb.IMAGE_SIZE[1]}-q{lb.JPEG_QUALITY}", args.images)
    tmp = Path(tempfile.mkdtemp(prefix="mapclip-ray-bench-"))
    base = {"checkpoint": str(lb.ensure_checkpoint(cache)), "folder": str(images[0].parent),
            "images": [str(p) for p in images], "batch_size": args.batch_size, "workers": args.workers,
            "threads": args.threads, "object_store": args.object_store_mb * 2**20}
    runs = {"local": [], "ray": [], "ray-data": []}
    try:
        for round_ in range(1, args.rounds + 1):
            lb.log(f"round {round_} of {args.rounds}")
            for name in ("local", "ray", *(() if args.no_ray_data else ("ray-data",))):
                label = f"{name}-{round_}"
                params = {**base, "db": str(tmp / f"{label}.db"), "vectors": str(tmp / f"{label}.npz")}
                runs[name].append(run_phase(name, params, args.quiet_wait, args.pause_file))
        runs["cosine"] = run_phase("cosine", {"a": str(tmp / "local-1.npz"), "b": str(tmp / "ray-1.npz")}, 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, runs, command)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
