"""Did fine-tuning help?  Recall@k before and after, on the held-out test split.

Both models embed the same test images and captions; the table shows text-to-image and
image-to-text recall@1/5/10 and median rank for the random baseline, the base model and the
fine-tuned model side by side (``metrics.py`` defines them).  Written as evaluation.md,
evaluation.json and a bar chart evaluation.png.

Where the images carry a ground-truth map kind (the demo collection's metadata.csv has a
``kind`` column), a second table gives, for each kind's plain query ("nautical chart"), the
share of the top 10 images over the whole dataset (all splits) that are of that kind: what
a person typing that query would see.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from datasette_mapclip.model.clip import (
    ClipEncoder,
    ModelSpec,
    ModelUnavailable,
    import_open_clip,
    load_encoder,
    pick_device,
)

from . import checkpoints
from .chart import bar_chart
from .dataset import SPLITS, DatasetError, read_split
from .kinds import KINDS
from .metrics import KS, precision_at_k, retrieval_metrics
from .pairs import ImageSource, load_all
from .train import NO_PRETRAINED, seed_everything

TOP_K = 10


class EvaluationError(RuntimeError):
    pass


def build_encoder(architecture: str, pretrained: str | None, checkpoint: str | None, *, seed: int = 0,
                  device: str | None = None) -> ClipEncoder:
    """An fp32 encoder for a checkpoint, a pretrained tag, or (``pretrained`` none) the seeded
    random initialisation that ``train --pretrained none`` started from."""
    device = pick_device(device)
    if checkpoint or (pretrained or "").lower() not in NO_PRETRAINED:
        try:
            return load_encoder(ModelSpec.from_options(architecture, pretrained, checkpoint), device=device,
                                precision="fp32")
        except ModelUnavailable as error:
            raise EvaluationError(str(error)) from None
    open_clip = import_open_clip()
    seed_everything(seed)
    model, _, transform = open_clip.create_model_and_transforms(architecture, pretrained=None, device=device)
    model.eval()
    spec = ModelSpec(architecture, f"random-init-seed-{seed}", None)
    return ClipEncoder(spec, model, transform, open_clip.get_tokenizer(architecture), device, "fp32")


def encode_images(encoder: ClipEncoder, images, batch_size: int = 64) -> np.ndarray:
    chunks = [encoder.encode_images(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)


def encode_texts(encoder: ClipEncoder, texts: list[str], batch_size: int = 256) -> np.ndarray:
    chunks = [encoder.encode_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)


def find_kinds(image_paths: list[str]) -> list[str | None]:
    """Ground-truth kind per image from a ``metadata.csv`` (columns file, kind) in the image's
    folder or one above it, as the demo collection writes; None where there is none."""
    tables: dict[Path, dict[str, str] | None] = {}

    def table(folder: Path):
        if folder not in tables:
            path = folder / "metadata.csv"
            tables[folder] = None
            if path.is_file():
                with open(path, newline="", encoding="utf-8-sig") as f:
                    reader = csv.DictReader(f)
                    if reader.fieldnames and {"file", "kind"} <= set(reader.fieldnames):
                        tables[folder] = {row["file"].strip(): row["kind"].strip() for row in reader if row.get("kind")}
        return tables[folder]

    kinds = []
    for image in image_paths:
        path, kind = Path(image), None
        if not image.startswith(("http://", "https://")):
            for folder in list(path.parents)[:3]:
                found = table(folder)
                if found is not None:
                    kind = found.get(path.relative_to(folder).as_posix())
                    break
        kinds.append(kind)
    return kinds


def kind_queries(kinds) -> dict[str, str]:
    """kind key -> the plain query a person would type for it."""
    return {kind: KINDS.get(kind, kind.replace("_", " ")) for kind in sorted({k for k in kinds if k})}


def _models_from_training(checkpoint: str) -> dict:
    return checkpoints.read_training_json(Path(checkpoint).resolve().parent)


def evaluate(dataset_dir: str, checkpoint: str, *, model: str | None = None, base_model: str | None = None,
             base_pretrained: str | None = None, base_checkpoint: str | None = None, out_dir: str | None = None,
             split: str = "test", device: str | None = None, workers: int = 4, progress: bool = True,
             echo=print) -> dict:
    if not Path(checkpoint).is_file():
        raise EvaluationError(f"checkpoint not found: {checkpoint}")
    training = _models_from_training(checkpoint)
    model = model or training.get("architecture")
    if not model:
        raise EvaluationError(
            f"no --model given and no {checkpoints.TRAINING_JSON} beside {checkpoint} to read it from")
    start = training.get("start", {})
    seed = int(training.get("args", {}).get("seed", 0))
    base_model = base_model or model
    if base_checkpoint is None and base_pretrained is None:
        # Where the run started: a checkpoint, a pretrained tag, or no weights at all (None or
        # "none": the seeded random initialisation).  Without a training.json: 'openai'.
        base_checkpoint = start.get("checkpoint")
        base_pretrained = start.get("pretrained") or ("none" if start else "openai")
    out = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    try:
        pairs = read_split(dataset_dir, split)
        everything = [p for s in SPLITS for p in read_split(dataset_dir, s)]
    except DatasetError as error:
        raise EvaluationError(str(error)) from None
    if len(pairs) < 2:
        raise EvaluationError(f"the {split} split has {len(pairs)} pairs; evaluation needs at least 2")

    encoders = {
        "base": build_encoder(base_model, base_pretrained, base_checkpoint, seed=seed, device=device),
        "fine-tuned": build_encoder(model, None, checkpoint, device=device),
    }
    image_size = max(e.image_size for e in encoders.values())
    source = ImageSource(image_size)

    kinds_all = find_kinds([p.image for p in everything])
    with_kind = any(kinds_all)
    wanted = everything if with_kind else pairs
    images, errors = load_all(source, [p.image for p in wanted], workers=workers, progress=progress,
                              desc="images")
    for error in errors[:5]:
        echo(f"skipped image {error}")
    by_map = {p.map_id: image for p, image in zip(wanted, images)}
    pairs = [p for p in pairs if by_map.get(p.map_id) is not None]
    captions = [p.caption for p in pairs]

    results = {"dataset": str(Path(dataset_dir).resolve()), "split": split, "models": {}, "retrieval": {},
               "kinds": None}
    vectors_all = {}
    for label, encoder in encoders.items():
        results["models"][label] = encoder.name
        image_vectors = encode_images(encoder, [by_map[p.map_id] for p in pairs])
        text_vectors = encode_texts(encoder, captions)
        results["retrieval"][label] = retrieval_metrics(image_vectors, text_vectors, captions)
        if with_kind:
            kept = [(p, k) for p, k in zip(everything, kinds_all) if by_map.get(p.map_id) is not None]
            vectors_all[label] = (encode_images(encoder, [by_map[p.map_id] for p, _ in kept]), [k for _, k in kept])
    results["random"] = results["retrieval"]["base"]["random"]
    results["images"] = results["retrieval"]["base"]["images"]
    results["captions"] = results["retrieval"]["base"]["captions"]

    if with_kind:
        labels = vectors_all["base"][1]
        queries = kind_queries(labels)
        table = {}
        for kind, query in queries.items():
            row = {"query": query, "images": labels.count(kind), "random": labels.count(kind) / len(labels)}
            for label, encoder in encoders.items():
                query_vector = encoder.encode_texts([query])[0]
                row[label] = precision_at_k(vectors_all[label][0], labels, query_vector, kind, TOP_K)
            table[kind] = row
        results["kinds"] = {"k": TOP_K, "collection_images": len(labels), "per_kind": table,
                            "mean": {label: float(np.mean([r[label] for r in table.values()]))
                                     for label in ("random", *encoders)}}

    markdown = to_markdown(results)
    (out / "evaluation.md").write_text(markdown)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    groups, series = chart_data(results)
    bar_chart(groups, series, out / "evaluation.png",
              title=f"Recall@k on the {split} split ({results['images']} images)")
    results["files"] = [str(out / name) for name in ("evaluation.md", "evaluation.json", "evaluation.png")]
    echo(markdown)
    return results


def chart_data(results: dict) -> tuple[list[str], dict[str, list[float]]]:
    groups, series = [], {"random": [], "base": [], "fine-tuned": []}
    for direction, short in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
        for k in KS:
            groups.append(f"{short} R@{k}")
            series["random"].append(results["random"][direction][f"R@{k}"])
            for label in ("base", "fine-tuned"):
                series[label].append(results["retrieval"][label][direction][f"R@{k}"])
    return groups, series


def to_markdown(results: dict) -> str:
    base, tuned = results["retrieval"]["base"], results["retrieval"]["fine-tuned"]
    lines = [
        f"# Evaluation on the {results['split']} split",
        "",
        f"{results['images']} images, {results['captions']} distinct captions "
        f"(dataset {results['dataset']}).",
        f"Base: `{results['models']['base']}`; fine-tuned: `{results['models']['fine-tuned']}`.",
        "",
        "| metric | random | base | fine-tuned |",
        "|---|---:|---:|---:|",
    ]
    for direction, name in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
        for metric in [f"R@{k}" for k in KS] + ["median_rank"]:
            fmt = "{:.1f}" if metric == "median_rank" else "{:.3f}"
            label = "median rank" if metric == "median_rank" else metric.replace("R@", "recall@")
            lines.append(f"| {name} {label} | {fmt.format(results['random'][direction][metric])} | "
                         f"{fmt.format(base[direction][metric])} | {fmt.format(tuned[direction][metric])} |")
    if results.get("kinds"):
        kinds = results["kinds"]
        lines += [
            "",
            f"## Map kinds: precision@{kinds['k']} of a plain query over all {kinds['collection_images']} images",
            "",
            "| kind | query | images | random | base | fine-tuned |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for kind, row in kinds["per_kind"].items():
            lines.append(f"| {kind} | \"{row['query']}\" | {row['images']} | {row['random']:.2f} | "
                         f"{row['base']:.2f} | {row['fine-tuned']:.2f} |")
        mean = kinds["mean"]
        lines.append(f"| **mean** | | | {mean['random']:.2f} | {mean['base']:.2f} | {mean['fine-tuned']:.2f} |")
    return "\n".join(lines) + "\n"
