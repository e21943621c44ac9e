"""Query encoders: ViT-B-32's query side exported to ONNX (datasette_mapclip/model/export.py) against
open_clip on torch, on this machine's CPU, one query at a time as a server encodes them.

    .venv/bin/python bench/query_encoder_bench.py            # writes bench/results/query-encoders.md
    .venv/bin/python bench/query_encoder_bench.py --install-size   # also the serving install's size (pip, network)

Measured: export time and the stored sizes; the probe check's cosines; text and image encode latency
(p50/p95) for torch fp32 (ClipEncoder, text trimmed at the end-of-text token), ONNX fp32 and ONNX
int8 at 1 thread (the server's default); a cold process's import + load + first text query for each
path; and with --install-size, `pip install` of the wheel without extras into an empty folder (du).

The weights are seeded random (bench/search_bench.py's checkpoint: no download); timing does not
depend on the weights, the int8 check's cosines do (real CLIP weights are checked when a real
collection is loaded, and stored with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

COLD = """
import sys, time, json
started = time.perf_counter()
path = sys.argv[1]
if sys.argv[2] == "stored":
    from datasette_mapclip.model.query_encoders import QueryEncoder
    parts = {name: open(f"{path}/{name}", "rb").read() for name in ("text", "image", "tokenizer", "preprocess")}
    encoder = QueryEncoder(parts, threads=1)
else:
    from datasette_mapclip.model.clip import ModelSpec, load_encoder
    from datasette_mapclip.runtime import set_torch_threads
    set_torch_threads(1)
    encoder = load_encoder(ModelSpec("ViT-B-32", None, path), device="cpu", precision="fp32")
loaded = time.perf_counter()
encoder.encode_texts(["nautical chart"])
done = time.perf_counter()
print(json.dumps({"load": loaded - started, "first_query": done - started}))
"""


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def timed(fn, items, repeat: int = 1) -> list[float]:
    fn(items[:1])  # warm
    times = []
    for _ in range(repeat):
        for item in items:
            started = time.perf_counter()
            fn([item])
            times.append((time.perf_counter() - started) * 1000)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=200, help="queries timed per path")
    parser.add_argument("--images", type=int, default=40, help="uploads timed per path")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes per path")
    parser.add_argument("--install-size", action="store_true", help="pip install the wheel (no extras) and du it")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "query-encoders.md")
    args = parser.parse_args()

    import numpy as np
    import torch
    from search_bench import random_checkpoint

    from datasette_mapclip.model.clip import ModelSpec, load_encoder
    from datasette_mapclip.model.export import export_query_encoders
    from datasette_mapclip.model.probes import probe_images, probe_texts
    from datasette_mapclip.model.query_encoders import QueryEncoder

    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    checkpoint = random_checkpoint(cache)
    torch.set_num_threads(1)
    encoder = load_encoder(ModelSpec("ViT-B-32", None, str(checkpoint)), device="cpu", precision="fp32")

    os.environ["MAPCLIP_ENCODER_CACHE"] = "off"
    started = time.perf_counter()
    exported = export_query_encoders(encoder)
    export_seconds = time.perf_counter() - started
    fp32 = export_query_encoders(encoder, int8=False)
    stored_dir = cache / "query-encoders-vit-b-32"
    exported.save(stored_dir)

    texts = probe_texts()[:args.texts]
    images = probe_images()[:args.images]
    int8_encoder = QueryEncoder(exported.parts, exported.precisions, threads=1)
    fp32_parts = {**exported.parts, "text": fp32.parts["text"], "image": fp32.parts["image"]}
    fp32_encoder = QueryEncoder(fp32_parts, threads=1)
    rows = []
    reference_text = encoder.encode_texts(texts)
    reference_image = encoder.encode_images([im.convert("RGB") for im in images])
    for label, fn_text, fn_image in (
            ("open_clip fp32 (torch, text trimmed)", encoder.encode_texts,
             lambda ims: encoder.encode_images([im.convert("RGB") for im in ims])),
            ("ONNX fp32", fp32_encoder.encode_texts, fp32_encoder.encode_images),
            (f"ONNX stored ({int8_encoder.precision})", int8_encoder.encode_texts, int8_encoder.encode_images)):
        text_ms = timed(fn_text, texts)
        image_ms = timed(fn_image, images)
        text_cos = float((np.concatenate([fn_text([t]) for t in texts[:100]]) * reference_text[:100]).sum(1).min())
        image_cos = float((fn_image(images) * reference_image).sum(1).min())
        rows.append((label, *percentiles(text_ms), *percentiles(image_ms), text_cos, image_cos))

    cold = {}
    for kind, path in (("stored", stored_dir), ("torch", checkpoint)):
        runs = []
        for _ in range(args.cold_runs):
            out = subprocess.run([sys.executable, "-c", COLD, str(path), kind], capture_output=True, text=True,
                                 cwd=ROOT, timeout=600)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cold[kind] = runs

    install = None
    if args.install_size:
        with tempfile.TemporaryDirectory() as dist, tempfile.TemporaryDirectory() as target:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", dist, str(ROOT)], check=True, timeout=600)
            wheel = next(Path(dist).glob("datasette_mapclip-*.whl"))
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", target, str(wheel)],
                           check=True, timeout=1800)
            du = subprocess.run(["du", "-sm", target], capture_output=True, text=True, check=True)
            install = int(du.stdout.split()[0])
            has_torch = (Path(target) / "torch").exists()

    sizes = {part: len(data) / 1e6 for part, data in exported.parts.items()}
    check = exported.check
    lines = [
        "# Query encoders: ONNX from the collection file against open_clip on torch",
        "",
        f"`bench/query_encoder_bench.py`, ViT-B-32 (seeded random weights), CPU, 1 thread, {os.cpu_count()} cores,"
        f" one query at a time; {len(texts)} texts and {len(images)} images from the probe set. Measured "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| path | text p50 / p95 (ms) | image p50 / p95 (ms) | min cosine to open_clip fp32: text / image |",
        "|---|---|---|---|",
    ]
    for label, t50, t95, i50, i95, tc, ic in rows:
        lines.append(f"| {label} | {t50:.1f} / {t95:.1f} | {i50:.1f} / {i95:.1f} | {tc:.5f} / {ic:.5f} |")
    lines += [
        "",
        f"Export (both towers, tokenizer, probe check on {check['texts']} texts and {check['images']} images, "
        f"int8 trial): {export_seconds:.0f} s. Stored: " + ", ".join(
            f"{part} {exported.precisions.get(part, '')} {size:.1f} MB".replace("  ", " ")
            for part, size in sizes.items()) + ".",
        f"Probe check: int8 min cosine text {check['int8_min_cosine'].get('text')}, image "
        f"{check['int8_min_cosine'].get('image')} (int8 kept where >= {check['threshold']}; with random weights "
        "the figures say little about real CLIP weights, which are checked when a collection is loaded).",
        "",
        "| cold process, median of runs (range) | load (s) | import + load + first text query (s) |",
        "|---|---|---|",
    ]
    for kind, runs in cold.items():
        loads = [r["load"] for r in runs]
        firsts = [r["first_query"] for r in runs]
        label = "stored ONNX encoders (no torch)" if kind == "stored" else "open_clip on torch, checkpoint"
        lines.append(f"| {label}, {len(runs)} runs | {statistics.median(loads):.2f} ({min(loads):.2f}-{max(loads):.2f})"
                     f" | {statistics.median(firsts):.2f} ({min(firsts):.2f}-{max(firsts):.2f}) |")
    if install is not None:
        lines += ["", f"Serving install (`pip install` of the wheel without extras into an empty folder, `du`): "
                      f"{install} MB{' (torch present!)' if has_torch else ', no torch'}."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
