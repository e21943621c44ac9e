#!/usr/bin/env python
"""ViT-B-32 fp16 on one CUDA GPU: model-only, CPU decode-only and the Ray engine end to end.

Runs only where ``torch.cuda.is_available()``; elsewhere it says so and exits (status 0).
Goal: >= 2,500 images/s end to end on one H100 (clip-retrieval reports about that on an A100,
"bottlenecked by resizing").

Phases, in this process:

  model-only   preprocessed 224 px tensors (made once on the CPU) through
               ``ClipEncoder.encode_image_tensors`` in fp16 at several batch sizes, host-to-device
               copy included: the GPU's ceiling
  decode-only  the engine's fetch tasks (``loaders.ray_engine.prepare_chunk``: read, draft decode,
               open_clip preprocess) on every CPU core, no model: the CPU side's ceiling
  end to end   ``run_ray_load`` (``--engine ray``): a folder of 512 px JPEG derivatives (what a IIIF
               ``!512,512`` request returns) decoded by Ray tasks on the CPU cores, one fp16 model
               actor on the GPU, the driver writing the SQLite database

Inputs: ``--unique`` synthetic scanned maps (the loader benchmark's drawing) reduced to fit
512 x 512 at JPEG quality 85 (~50-60 KB, like loc.gov's derivatives), copied to ``--images``
files; the model is ViT-B-32 with seeded random weights (no download).  Results go to
``bench/results/gpu.md``.

The GPU machine has torch but not open_clip or Ray: carry wheels (bench/README.md, "GPU").

    python3 bench/gpu_bench.py                      # 20,000 images, batches 256/512/1024
    python3 bench/gpu_bench.py --images 5000 --batch-size 512
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

GOAL = 2500.0
DERIVATIVE = 512
NEEDED = ("open_clip", "ray", "sqlite_vec", "datasette", "httpx", "tqdm", "PIL", "numpy")


def log(message: str):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def make_derivatives(folder: Path, unique: int, count: int) -> list[Path]:
    """``count`` JPEGs fitting 512 x 512: ``unique`` drawn maps, the rest copies (decode costs the same)."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        originals = list(pool.map(_derivative, range(unique), [folder] * unique))
    paths = list(originals)
    for i in range(unique, count):
        path = folder / f"map-{i:06d}.jpg"
        shutil.copyfile(originals[i % unique], path)
        paths.append(path)
    return paths


def _derivative(index: int, folder: Path) -> Path:
    import loader_bench
    from PIL import Image

    image = loader_bench.synthetic_map(index)
    image.thumbnail((DERIVATIVE, DERIVATIVE), Image.Resampling.BICUBIC)
    path = folder / f"map-{index:06d}.jpg"
    image.save(path, "JPEG", quality=85)
    return path


def checkpoint(cache: Path) -> str:
    import loader_bench

    return str(loader_bench.ensure_checkpoint(cache))


def phase_model_only(ckpt: str, paths: list[Path], batches: list[int], seconds: float) -> list[dict]:
    import torch

    from datasette_mapclip.model.clip import ModelSpec, load_encoder
    from datasette_mapclip.model.images import open_image

    encoder = load_encoder(ModelSpec("ViT-B-32", None, ckpt), device="cuda", precision="fp16")
    sample = torch.stack([encoder.preprocess(open_image(p.read_bytes(), min_size=224)) for p in paths[:64]])
    out = []
    for batch in batches:
        pixels = sample.repeat(batch // len(sample) + 1, 1, 1, 1)[:batch].contiguous().pin_memory()
        for _ in range(3):
            encoder.encode_image_tensors(pixels)
        torch.cuda.synchronize()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            encoder.encode_image_tensors(pixels)  # returns numpy: synchronised
            done += batch
        rate = done / (time.perf_counter() - started)
        log(f"model-only fp16 batch {batch}: {rate:,.0f} img/s")
        out.append({"batch": batch, "rate": rate})
    return out


def phase_decode_only(paths: list[Path], threads: int) -> dict:
    import ray

    from datasette_mapclip.model.clip import import_open_clip
    from loaders.ray_engine import CHUNK, FetchSettings, Preprocessor, prepare_chunk, warm_up
    from loaders.sources.folder import folder_records

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
    cpus = int(ray.cluster_resources()["CPU"])
    ray.get([ray.remote(warm_up).options(num_cpus=1).remote() for _ in range(cpus)])
    preprocessor = ray.put(Preprocessor(224, import_open_clip().image_transform(224, is_train=False)))
    task = ray.remote(prepare_chunk).options(num_cpus=1, num_returns=2)
    records = [(r, None) for r in folder_records(paths[0].parent)]
    started = time.perf_counter()
    refs = [task.remote(records[i:i + CHUNK], preprocessor, FetchSettings(), None, store_thumbnail=False,
                        max_pixels=10**9, keep_size=None, threads=threads)
            for i in range(0, len(records), CHUNK)]
    pending = [pixels for _, pixels in refs]
    while pending:  # drop results as they come, as the actor would consume them
        _, pending = ray.wait(pending, num_returns=min(len(pending), 16), fetch_local=False)
    rate = len(records) / (time.perf_counter() - started)
    ray.shutdown()
    log(f"decode-only on {cpus} CPUs: {rate:,.0f} img/s")
    return {"rate": rate, "cpus": cpus}


def phase_end_to_end(ckpt: str, paths: list[Path], batch: int, threads: int, tmp: Path) -> dict:
    from datasette_mapclip.model.clip import ModelSpec
    from datasette_mapclip.store import MapStore
    from loaders.ray_engine import RayOptions, run_ray_load
    from loaders.sources.folder import folder_records

    store = MapStore(tmp / "gpu.db")
    commits = []
    write_batch = store.write_batch

    def timed(model, records, *args, **kwargs):
        result = write_batch(model, records, *args, **kwargs)
        commits.append((time.perf_counter(), len(records)))
        return result

    store.write_batch = timed
    described = {}
    started = time.perf_counter()
    summary = run_ray_load(store, ModelSpec("ViT-B-32", None, ckpt), folder_records(paths[0].parent),
                           options=RayOptions(init={"include_dashboard": False}), precision="auto",
                           batch_size=batch, workers=threads, store_thumbnails=False, progress=False,
                           echo=lambda line: described.setdefault("line", line) and None)
    wall = time.perf_counter() - started
    steady = None
    if len(commits) > 2:
        steady = sum(n for _, n in commits[1:]) / (commits[-1][0] - commits[0][0])
    precision = store.model()["precision"]
    store.close()
    log(f"end to end: {summary.line()}; steady {steady or 0:,.0f} img/s")
    return {"rate": summary.rate, "steady": steady, "wall": wall, "loaded": summary.loaded, "failed": summary.failed,
            "precision": precision, "cluster": described.get("line", "")}


def report(args, model_only, decode, e2e, command) -> str:
    import torch

    name = torch.cuda.get_device_name(0)
    best_model = max(model_only, key=lambda r: r["rate"])
    result = "PASS" if e2e["rate"] >= GOAL else "FAIL"
    lines = [
        "# GPU benchmark", "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {name}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "- model: ViT-B-32, seeded random weights, fp16 (autocast) on the GPU",
        f"- inputs: {args.images} JPEGs fitting {DERIVATIVE}x{DERIVATIVE} (quality 85, {args.unique} unique)",
        f"- command: `{command}`", "",
        "| phase | img/s | notes |", "|---|---:|---|",
        *(f"| model-only, batch {r['batch']} | {r['rate']:,.0f} | precomputed 224 px tensors, host-to-device copy "
          "included |" for r in model_only),
        f"| decode-only | {decode['rate']:,.0f} | Ray fetch tasks on {decode['cpus']} CPUs, {args.threads} threads "
        "each: read, draft decode, preprocess |",
        f"| end to end (--engine ray) | {e2e['rate']:,.0f} | steady {e2e['steady'] or 0:,.0f}; batch {args.batch_size}, "
        f"{e2e['loaded']} loaded, {e2e['failed']} failed, precision {e2e['precision']}; {e2e['cluster']} |", "",
        "| goal | measured | target | result |", "|---|---:|---:|---|",
        f"| end to end img/s on one GPU | {e2e['rate']:,.0f} | >= {GOAL:,.0f} | {result} |",
        f"| (model-only ceiling, best batch) | {best_model['rate']:,.0f} | | |",
        f"| (CPU decode ceiling) | {decode['rate']:,.0f} | | |",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="images end to end (default 20,000)")
    parser.add_argument("--unique", type=int, default=256, help="distinct drawn maps among them (default 256)")
    parser.add_argument("--batch-size", type=int, default=512, help="end-to-end batch (default 512)")
    parser.add_argument("--model-batches", default="256,512,1024", help="model-only batch sizes")
    parser.add_argument("--model-seconds", type=float, default=5.0, help="seconds per model-only batch size")
    parser.add_argument("--threads", type=int, default=2, help="threads per fetch task (default 2)")
    parser.add_argument("--cache-dir", default=str(BENCH_DIR / ".cache"), help="checkpoint cache")
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "gpu.md"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (this script runs only where torch.cuda.is_available()).")
        return 0
    missing = missing_packages()
    if missing:
        print(f"missing Python packages: {', '.join(missing)}; carry them as wheels (bench/README.md, 'GPU').")
        return 1
    command = " ".join([Path(sys.executable).name, os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]])
    tmp = Path(tempfile.mkdtemp(prefix="mapclip-gpu-bench-"))
    try:
        log(f"drawing {args.unique} maps, {args.images} files of {DERIVATIVE} px")
        paths = make_derivatives(tmp / "maps", args.unique, args.images)
        ckpt = checkpoint(Path(args.cache_dir))
        model_only = phase_model_only(ckpt, paths, [int(b) for b in args.model_batches.split(",")], args.model_seconds)
        decode = phase_decode_only(paths, args.threads)
        e2e = phase_end_to_end(ckpt, paths, args.batch_size, args.threads, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, model_only, decode, e2e, command)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
