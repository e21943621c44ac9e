"""The offline demo: draw a map collection, train a small CLIP model on it, load it, serve it.

    python -m fine_tune.demo [DIR] [--port 8001] [--no-serve]     (or: mapclip demo [DIR])

Everything happens under DIR (default ./demo): the images, the model checkpoint, demo.db and a
metadata.yml that tells visitors which model they are using.  Steps already done are skipped,
so a second run starts the server at once.  It drives the same Python API as the commands:
``loaders.pipeline.run_load`` and the ``fine_tune`` dataset, train, evaluate and register steps.

The demo has to convince: each kind's plain query ("geological map", "nautical chart", ...)
must bring back that kind, whatever the training seed.  So the model is trained at three
seeds (``SEEDS``; the first is the one served) and demo/model/evaluation.md has a kind x seed
table of precision@10 marked PASS/FAIL against ``PASS_MARK``.

Some maps are lettered sheets of 1,024 px (``lettering.py``) whose printed names are recorded in
collection/words.csv.  While the model trains, a second thread reads them with ``mapclip ocr``'s
reader (``loaders.ocr_cli.read_maps``: the same engine, image source and word store); the
evaluation then scores the words read against that truth and searches the collection for the
printed names with the ``words`` parameter (``evaluation-ocr.json`` and a section of
evaluation.md).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import click

DEMO_MODEL = "mapclip-tiny"
# Bump when the drawing or the training recipe changes: a demo folder built by another version
# is rebuilt (its collection, pairs, model and database), never mixed with this one's.
DEMO_VERSION = "3"
VERSION_FILE = ".demo-version"
BUILT = ("collection", "pairs", "pairs-train", "model", "demo.db", "demo.db-wal", "demo.db-shm", "metadata.yml")


def demo_metadata(model_name: str, how: str, example_queries: list[str] | None = None,
                  example_map: int | None = None) -> str:
    """metadata.yml for the demo.  The plugin's configuration for the ``demo`` database carries
    ``model_note`` and the search page's examples: ``example_queries`` (one plain query per
    kind) and ``example_map`` (the id of one map in ``maps``, for "maps like this one")."""
    note = (f"This demo uses {model_name}, a small CLIP model {how}, so it runs offline. Real collections use "
            "real CLIP weights (OpenAI's ViT-B/32, as the paper did).")
    database_config = {"model_note": note}
    if example_queries:
        database_config["example_queries"] = list(example_queries)
    if example_map is not None:
        database_config["example_map"] = int(example_map)
    # JSON is YAML: every string is quoted safely, whatever it holds.
    config = "\n".join(f"        {key}: {json.dumps(value)}" for key, value in database_config.items())
    return f"""title: datasette-mapclip demo collection
description_html: |-
  <p>360 procedurally drawn maps of eight kinds (relief maps, political maps, city street plans,
  nautical charts, choropleth maps, manuscript maps, geological maps, fire insurance plans) with
  catalogue-style records. Try the <a href="/-/mapclip?q=nautical+chart">map search</a>.
  Some are lettered sheets of 1,024 px whose printed place names were read by OCR: try the
  <a href="/-/mapclip?q=Cape+Fear&amp;words=Cape+Fear">words printed on the maps</a>.</p>
plugins:
  datasette-mapclip:
    model_note: {json.dumps(note)}
databases:
  demo:
    plugins:
      datasette-mapclip:
{config}
    tables:
      map_vectors:
        hidden: true
"""


def ensure_fresh(workdir: Path) -> None:
    """Clear what an older version of the demo built under ``workdir`` (only the demo's own
    files and folders), so this version's drawing and recipe are what gets served."""
    marker = workdir / VERSION_FILE
    if marker.exists() and marker.read_text().strip() == DEMO_VERSION:
        return
    stale = [workdir / name for name in BUILT if (workdir / name).exists()]
    if stale:
        click.echo(f"{workdir} was built by another version of the demo: rebuilding it", err=True)
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(DEMO_VERSION + "\n")


@dataclass(frozen=True)
class Recipe:
    """What the demo draws and how it trains: ``make demo``'s defaults; tests build a small one."""

    count: int = 360
    size: int = 256
    lettered_per_kind: int = 3  # lettered sheets of each kind, read by OCR (24 of the 360)
    lettered_size: int = 1024
    lettered_kinds: tuple[str, ...] | None = None  # None: every kind
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10


RECIPE = Recipe()


def ensure_collection(folder: Path, recipe: Recipe = RECIPE) -> Path:
    from .maps import generate_demo_collection

    if not (folder / "metadata.csv").exists():
        click.echo(f"drawing the demo collection into {folder} ...", err=True)
        generate_demo_collection(folder, count=recipe.count, size=recipe.size,
                                 lettered_per_kind=recipe.lettered_per_kind, lettered_size=recipe.lettered_size,
                                 lettered_kinds=recipe.lettered_kinds)
    return folder


def random_start(workdir: Path) -> Path:
    """A seeded random mapclip-tiny: the base the demo model is trained from (and compared with)."""
    checkpoint = workdir / "model" / "random-start.pt"
    if checkpoint.exists():
        return checkpoint
    import torch

    from datasette_mapclip.model.clip import import_open_clip

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=None)
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


def tiny_encoder(checkpoint: Path):
    from datasette_mapclip.model.clip import ModelSpec, load_encoder

    return load_encoder(ModelSpec(DEMO_MODEL, None, str(checkpoint)), precision="fp32")


def check(summary, step: str):
    """Stop the demo when a step did not finish (the reason is in the summary line)."""
    if summary.status != "finished":
        raise click.ClickException(f"{step} did not finish: {summary.line()}")


# The recipe that trains the demo model (fine_tune's defaults are for real CLIP weights).
TRAINING = {"model": DEMO_MODEL, "pretrained": "none", "epochs": 10, "lr": 5e-4, "batch_size": 32,
            "patience": 0}
# The served model is trained at the first seed; all of them are evaluated kind by kind.
SEEDS = RECIPE.seeds
PASS_MARK = 0.8
# Besides the full catalogue caption, each training image is paired with two short ones drawn
# from the same record: its subject headings ("Geological maps, Geology, Pennsylvania") and its
# title.  Searchers type short phrases; a text tower that only ever read 40-token captions
# places a 3-token query badly (the kinds' plain queries then depended on the seed).
EXTRA_CAPTIONS = ("{subjects}", "{title}")
FINAL = "final.pt"


def build_pairs(db_path: Path, pairs_dir: Path, training_dir: Path) -> None:
    """Map-caption pairs split by item (``pairs_dir``: one full caption per map, what evaluation
    reads), and the training copy (``training_dir``) whose training split has ``EXTRA_CAPTIONS``
    too: evaluating on the copy would count each training map three times."""
    from ..dataset import build_dataset, read_split

    click.echo(build_dataset(db_path, pairs_dir, template="subjects").line(), err=True)
    if training_dir.exists():
        shutil.rmtree(training_dir)
    shutil.copytree(pairs_dir, training_dir)
    train_csv = training_dir / "train.csv"
    with open(train_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames, list(reader)
    train_ids = [int(row["map_id"]) for row in rows]
    with tempfile.TemporaryDirectory(dir=training_dir.parent) as scratch:
        for number, template in enumerate(EXTRA_CAPTIONS):
            extra = Path(scratch) / str(number)
            build_dataset(db_path, extra, template=template)
            if [p.map_id for p in read_split(extra, "train")] != train_ids:  # same seed, same items
                raise click.ClickException("the caption variants split the collection differently")
            with open(extra / "train.csv", newline="", encoding="utf-8") as f:
                rows += list(csv.DictReader(f))
    with open(train_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    description = json.loads((training_dir / "dataset.json").read_text())
    description["extra_train_captions"] = list(EXTRA_CAPTIONS)
    description["counts"]["train"] = len(rows)
    (training_dir / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    click.echo(f"training pairs: {len(train_ids)} maps x {1 + len(EXTRA_CAPTIONS)} captions = {len(rows)}", err=True)


def train_seed(pairs_dir: Path, out_dir: Path, seed: int, keep_checkpoints: bool, epochs: int = 10,
               threads: int | None = None) -> Path:
    """Train the recipe at ``seed`` into ``out_dir``; returns the last epoch's weights.

    Why the last epoch and not best.pt: the validation loss is caption retrieval on held-out
    items (unseen titles and places) and bottoms out after a few epochs, while telling the
    kinds apart keeps improving to the end; best.pt failed a kind at some seeds."""
    import torch

    from .. import checkpoints
    from ..train import TrainingError, TrainOptions, train

    final = out_dir / FINAL
    if final.exists():
        return final
    try:
        result = train(TrainOptions(dataset_dir=str(pairs_dir), out_dir=str(out_dir), seed=seed, quiet=True,
                                    **{**TRAINING, "epochs": epochs, "threads": threads}), echo=lambda line: click.echo(line, err=True))
    except TrainingError as error:
        raise click.ClickException(str(error))
    click.echo(f"seed {seed}: {result.summary().splitlines()[0]}", err=True)
    if result.status not in ("finished", "already finished"):
        raise click.ClickException(f"training at seed {seed} did not finish: {result.status}")
    saved = torch.load(checkpoints.epoch_path(out_dir, result.epochs_done), map_location="cpu", weights_only=False)
    checkpoints.atomic_torch_save(saved["model"], final)
    if not keep_checkpoints:  # the other seeds are only evaluated: keep just their weights
        for _, path in checkpoints.epoch_checkpoints(out_dir):
            path.unlink()
        (out_dir / checkpoints.BEST).unlink(missing_ok=True)
    return final


def kind_precision(pairs_dir: Path, weights: dict[int, Path]) -> dict[int, dict[str, float]]:
    """seed -> kind -> precision@10 of the kind's plain query over every image of the dataset
    (all splits): the definition of ``fine_tune.evaluate``'s map-kinds table."""
    from ..dataset import SPLITS, read_split
    from ..evaluate import TOP_K, build_encoder, encode_images, find_kinds, kind_queries
    from ..metrics import precision_at_k
    from ..pairs import ImageSource, load_all

    everything = [p for split in SPLITS for p in read_split(pairs_dir, split)]
    table: dict[int, dict[str, float]] = {}
    images = kinds = None
    for seed, checkpoint in weights.items():
        encoder = build_encoder(DEMO_MODEL, None, str(checkpoint))
        if images is None:
            loaded, _ = load_all(ImageSource(encoder.image_size), [p.image for p in everything], progress=False)
            kept = [(image, kind) for image, kind in zip(loaded, find_kinds([p.image for p in everything]))
                    if image is not None and kind]
            images, kinds = [image for image, _ in kept], [kind for _, kind in kept]
        vectors = encode_images(encoder, images)
        table[seed] = {kind: precision_at_k(vectors, kinds, encoder.encode_texts([query])[0], kind, TOP_K)
                       for kind, query in kind_queries(kinds).items()}
    return table


def seeds_markdown(table: dict[int, dict[str, float]]) -> str:
    """The kind x seed table of precision@10, each kind marked PASS when every seed reaches PASS_MARK."""
    from ..evaluate import TOP_K, kind_queries

    seeds = list(table)
    kinds = list(next(iter(table.values())))
    queries = kind_queries(kinds)
    lines = [
        "",
        f"## Map kinds at {len(seeds)} training seeds: precision@{TOP_K} of a plain query",
        "",
        f"The same recipe trained from scratch at seeds {', '.join(map(str, seeds))} (seed {seeds[0]} is the model "
        f"served); each cell is precision@{TOP_K} over all images, as in the table above. "
        f"PASS: every seed reaches {PASS_MARK}.",
        "",
        "| kind | query | " + " | ".join(f"seed {seed}" for seed in seeds) + " | min | result |",
        "|---|---|" + "---:|" * (len(seeds) + 1) + "---|",
    ]
    for kind in kinds:
        values = [table[seed][kind] for seed in seeds]
        lines.append(f"| {kind} | \"{queries[kind]}\" | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {min(values):.2f} | {'PASS' if min(values) >= PASS_MARK else 'FAIL'} |")
    every = [table[seed][kind] for seed in seeds for kind in kinds]
    passed = sum(min(table[seed][kind] for seed in seeds) >= PASS_MARK for kind in kinds)
    lines.append("| **all** | | " + " | ".join(f"{sum(table[s].values()) / len(kinds):.2f}" for s in seeds)
                 + f" | {min(every):.2f} | {passed}/{len(kinds)} PASS |")
    return "\n".join(lines) + "\n"


def example_map_id(db_path: Path, kind: str = "nautical") -> int | None:
    """The id of the first map of ``kind`` (by its subject headings): the page's example image."""
    from datasette_mapclip.store import read_maps_readonly

    from .maps import kind_of

    for row in sorted(read_maps_readonly(db_path, ("id", "subjects")), key=lambda row: row["id"]):
        headings = row["subjects"] or []  # read back as a list
        if kind_of({"subjects": headings}) == kind:
            return int(row["id"])
    return None


class _TrainedHere(logging.Filter):
    """The demo's model starts from random weights on purpose: open_clip's warning that no pretrained
    weights were loaded says nothing to someone running the demo."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(f"No pretrained weights loaded for model '{DEMO_MODEL}'")


def build(workdir: Path, recipe: Recipe = RECIPE) -> Path:
    quiet = _TrainedHere()
    logging.getLogger().addFilter(quiet)
    try:
        return _build(workdir, recipe)
    finally:
        logging.getLogger().removeFilter(quiet)


# -- OCR of the lettered sheets, and its evaluation --------------------------------------------

OCR_JSON = "evaluation-ocr.json"
OCR_HEADING = "## Words printed on the maps: OCR against the drawn truth"
NAME_K = 10


def read_lettered(db_path: Path, collection: Path, threads: int | None = None) -> dict:
    """Read the words on the lettered sheets (those in words.csv) not yet read, as ``mapclip ocr``
    does (``loaders.ocr_cli.read_maps``: the same engine, image source and word store, each map's
    words and read mark in one transaction), in its own connection so it can run beside training.
    Returns the run's figures; raises ClickException when the OCR engine is missing."""
    from datasette_mapclip.store import MapStore
    from datasette_mapclip.store.words import WordStore
    from loaders.fetch import Fetcher, per_minute
    from loaders.ocr import ImageSource, OcrEngine, OcrSettings, OcrUnavailable
    from loaders.ocr_cli import OcrSummary, read_maps

    from .lettering import read_truth

    lettered = set(read_truth(collection))
    try:
        engine = OcrEngine(OcrSettings(threads=threads))
    except OcrUnavailable as error:
        raise click.ClickException(str(error))
    store = MapStore(db_path)
    fetcher = Fetcher(per_minute(0))
    try:
        words = WordStore(store)
        model = words.register_ocr_model(engine.provenance())
        targets, done = words.maps_to_read(model.id)
        targets = [target for target in targets if target.source_id in lettered]
        summary = OcrSummary(skipped=done)
        load_id = store.start_load(f"demo: ocr {db_path}", model.name)
        status = "failed"
        try:
            read_maps(words, engine, ImageSource(fetcher), targets, model.id, summary, workers=1, progress=False)
            status = "finished"
        finally:
            store.finish_load(load_id, status, summary.read, summary.skipped, summary.failed)
    finally:
        fetcher.close()
        store.close()
    return {"ocr_model": model.name, "threads": threads, "maps_read": summary.read, "words": summary.words,
            "failed": summary.failed, "seconds": round(summary.seconds, 1),
            "reading_seconds": round(summary.reading_seconds, 1), "line": summary.line()}


class Background(threading.Thread):
    """Runs a function beside the main thread; ``result()`` waits and re-raises its error."""

    def __init__(self, function, *args, **kwargs):
        super().__init__(name="demo-ocr", daemon=True)
        self._call = (function, args, kwargs)
        self._value = self._error = None

    def run(self):
        function, args, kwargs = self._call
        try:
            self._value = function(*args, **kwargs)
        except BaseException as error:  # handed to the main thread by result()
            self._error = error

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def score_ocr(db_path: Path, collection: Path) -> dict:
    """The words read on each lettered sheet against its truth (``lettering.score_sheet``)."""
    from datasette_mapclip.store import open_collection_readonly, read_map_reading, read_map_words, read_maps_readonly

    from .lettering import GROUPS, NO_LABEL, Tally, read_truth, score_sheet, summarise

    truth = read_truth(collection)
    ids = {row["source_id"]: row["id"] for row in read_maps_readonly(db_path, ("id", "source_id"))}
    totals = {group: Tally() for group in [*GROUPS, NO_LABEL]}
    sheets = unread = 0
    seconds = []
    conn = open_collection_readonly(db_path)
    try:
        for file, labels in truth.items():
            reading = read_map_reading(conn, ids[file]) if file in ids else None
            if reading is None:
                unread += 1
                continue
            width, height = reading["width"], reading["height"]
            readings = [(word["text"], (word["x"] * width, word["y"] * height, (word["x"] + word["w"]) * width,
                                        (word["y"] + word["h"]) * height)) for word in read_map_words(conn, ids[file])]
            for group, tally in score_sheet(labels, readings).items():
                totals[group].add(tally)
            sheets += 1
            seconds.append(reading["seconds"] or 0.0)
    finally:
        conn.close()
    figures = summarise(totals)
    figures.update({"sheets": sheets, "unread": unread, "labels": sum(len(labels) for labels in truth.values()),
                    "seconds_per_sheet": round(sum(seconds) / len(seconds), 2) if seconds else None})
    return figures


def name_search(db_path: Path, collection: Path, k: int = NAME_K) -> dict:
    """Search the collection for each printed name (``lettering.PRINTED_NAMES``) with the
    ``words`` parameter, as the search page does: precision@k is the share of the top k that
    truly print the name; recall, the share of the sheets printing it (at most k) found there."""
    from datasette_mapclip.search.local import Collection
    from datasette_mapclip.store import read_maps_readonly

    from .lettering import PRINTED_NAMES, prints_name, read_truth

    truth = read_truth(collection)
    files = {row["id"]: row["source_id"] for row in read_maps_readonly(db_path, ("id", "source_id"))}
    rows = []
    with Collection(db_path) as maps:
        for name in PRINTED_NAMES:
            found = [files.get(result["id"]) for result in maps.search(name, words=name, k=k)["results"]][:k]
            printing = {file for file, labels in truth.items() if prints_name(labels, name)}
            rows.append({"name": name, "printing": len(printing), "returned": len(found),
                         "true": sum(file in printing for file in found)})
    returned, true = sum(r["returned"] for r in rows), sum(r["true"] for r in rows)
    wanted = sum(min(r["printing"], k) for r in rows)
    return {"k": k, "names": rows, "precision": true / returned if returned else None,
            "recall": true / wanted if wanted else None}


OCR_TARGETS = {"horizontal_14": (0.9, 0.9), "rotated_curved": 0.7, "names": 0.9}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def ocr_markdown(report: dict) -> str:
    """evaluation.md's OCR section: word recall and precision by kind of label, and the printed-name search."""
    from .lettering import GROUPS, NO_LABEL

    ocr, names, run = report["ocr"], report["names"], report["run"]
    h14, rotated = ocr["horizontal_14"], ocr["rotated_curved"]
    h_pass = (h14["recall"] or 0) >= OCR_TARGETS["horizontal_14"][0] and \
        (h14["precision"] or 0) >= OCR_TARGETS["horizontal_14"][1]
    r_pass = (rotated["recall"] or 0) >= OCR_TARGETS["rotated_curved"]
    n_pass = (names["precision"] or 0) >= OCR_TARGETS["names"]
    lines = [
        "",
        OCR_HEADING,
        "",
        f"`mapclip ocr`'s reader (`{run['ocr_model']}`) read the {ocr['sheets']} lettered sheets "
        f"({report['lettered_size']} x {report['lettered_size']} px, {ocr['labels']} labels, whose text, style and "
        f"outline the demo recorded in collection/words.csv as it drew them) at {_fmt(ocr['seconds_per_sheet'])} s a "
        f"sheet. Word recall: the share of the words printed that a reading of their label holds; precision: the "
        f"share of the words read that their label holds (words read where no label is count as wrong). Words "
        f"compare with case, accents and punctuation folded; a label whose space OCR dropped (\"CapeFear\") "
        f"counts as missed words.",
        "",
        "| labels | words printed | recall | precision | letters recall |",
        "|---|---:|---:|---:|---:|",
    ]

    def row_of(name, row):
        return (f"| {name} | {row['truth_words']} | {_fmt(row['recall'])} | {_fmt(row['precision'])} | "
                f"{_fmt(row['letters_recall'])} |")

    lines += [row_of(group, ocr["groups"][group]) for group in GROUPS]
    lines += [
        f"| words read where no label is | | | {ocr['groups'][NO_LABEL]['read_words']} words | |",
        row_of("**all**", ocr["all"]),
        row_of("**horizontal, 14 px and over** (with faint and over hatching)", h14),
        row_of("**rotated, vertical and curved**", rotated),
        "",
        "Letters recall forgives a dropped space: a word counts as found when it lies inside the joined letters of "
        "its label's readings (\"SandyHook\" holds \"sandy\" and \"hook\"); the words search matches such "
        "run-together names too.",
        "",
        f"Targets (issue 22): horizontal labels of 14 px and over, recall and precision >= 0.9: "
        f"{'PASS' if h_pass else 'FAIL'}; rotated and curved labels, recall >= 0.7: {'PASS' if r_pass else 'FAIL'}.",
        "",
        f"### Printed-name search: precision@{names['k']}",
        "",
        f"Each name searched as the search page does with the words filter (`q` and `words` both the name); "
        f"precision@{names['k']}: the share of the top {names['k']} that truly print the name; recall: the share of "
        f"the sheets that print it (at most {names['k']}) among them.",
        "",
        "| name | sheets printing it | returned | of them printing it |",
        "|---|---:|---:|---:|",
    ]
    for row in names["names"]:
        lines.append(f"| \"{row['name']}\" | {row['printing']} | {row['returned']} | {row['true']} |")
    lines += [
        f"| **all** | | | precision@{names['k']} {_fmt(names['precision'])}, recall {_fmt(names['recall'])} |",
        "",
        f"Target: precision@{names['k']} >= 0.9: {'PASS' if n_pass else 'FAIL'}.",
    ]
    return "\n".join(lines) + "\n"


def _build(workdir: Path, recipe: Recipe = RECIPE) -> Path:
    """Every step of the demo under ``workdir``; returns the database path."""
    from datasette_mapclip.runtime import torch_threads
    from datasette_mapclip.store import MapStore
    from loaders.pipeline import run_load
    from loaders.query_encoders import after_embedding
    from loaders.sources.folder import folder_records

    from ..evaluate import evaluate
    from ..kinds import KINDS
    from ..register import register

    seeds = recipe.seeds
    ensure_fresh(workdir)
    collection = ensure_collection(workdir / "collection", recipe)
    db_path = workdir / "demo.db"
    pairs_dir, training_dir, model_dir = workdir / "pairs", workdir / "pairs-train", workdir / "model"
    click.echo("1/5 loading the collection with an untrained model (fills the catalogue tables)", err=True)
    store = MapStore(db_path)
    records = list(folder_records(collection))
    check(run_load(store, tiny_encoder(random_start(workdir)), records, command=f"demo: load folder {collection}",
                   store_thumbnails=True, total=len(records)), "loading the collection")
    # OCR runs beside steps 3 and 4 and is done before step 5 writes to the file again.  The cores
    # are shared out (one each on 2 cores), for all of steps 3 and 4: torch's threads wait for each
    # other at every step, so one of them losing its core (to ONNX Runtime, or to other work on a
    # shared machine) slowed the training epochs many times over.
    click.echo("2/5 reading the words on the lettered sheets (OCR), beside steps 3 and 4", err=True)
    cores = os.cpu_count() or 1
    ocr_threads = max(1, cores // 2)
    reading = Background(read_lettered, db_path, collection, threads=ocr_threads)
    # A daemon thread: should a step below fail or be interrupted, the process ends without waiting
    # for it, and loses no half-written map (each map's words and mark are one transaction).
    reading.start()
    share = max(1, cores - ocr_threads)
    with torch_threads(share):
        click.echo("3/5 map-caption pairs from the catalogue, split by item", err=True)
        if not (training_dir / "dataset.json").exists():
            build_pairs(db_path, pairs_dir, training_dir)
        click.echo(f"4/5 training the demo model at seeds {', '.join(map(str, seeds))} "
                   "(the longest step)", err=True)
        weights = {seed: train_seed(training_dir, model_dir if seed == seeds[0] else model_dir / f"seed-{seed}",
                                    seed, keep_checkpoints=seed == seeds[0], epochs=recipe.epochs, threads=share)
                   for seed in seeds}
        if not (model_dir / "evaluation.md").exists():
            evaluate(str(pairs_dir), str(weights[seeds[0]]), out_dir=str(model_dir), progress=False,
                     echo=lambda line: None)
            table = kind_precision(pairs_dir, weights)
            (model_dir / "evaluation-seeds.json").write_text(json.dumps(
                {"k": 10, "pass_mark": PASS_MARK, "seeds": {str(seed): row for seed, row in table.items()}},
                indent=2) + "\n")
            with open(model_dir / "evaluation.md", "a") as f:
                f.write(seeds_markdown(table))
    run = reading.result()
    click.echo(f"OCR: {run['line']}", err=True)
    click.echo("5/5 embedding the collection with the trained model", err=True)
    trained = tiny_encoder(weights[seeds[0]])
    summary, model, _ = register(store, trained, default=True)
    check(summary, "embedding with the trained model")
    # the served model's query encoders go into the file: the demo's server never needs torch
    after_embedding(store, trained, model.name, lambda line: click.echo(line, err=True))
    how = "trained from scratch on the pictures and catalogue captions of this demo collection by mapclip fine-tune"
    (workdir / "metadata.yml").write_text(demo_metadata(model.name, how, example_queries=list(KINDS.values()),
                                                        example_map=example_map_id(db_path)))
    store.close()
    write_ocr_evaluation(db_path, collection, model_dir, run, recipe)
    click.echo((model_dir / "evaluation.md").read_text(), err=True)
    return db_path


def write_ocr_evaluation(db_path: Path, collection: Path, model_dir: Path, run: dict, recipe: Recipe) -> None:
    """evaluation-ocr.json and evaluation.md's OCR section (once; a rerun keeps what an earlier run
    measured, as for the rest of evaluation.md)."""
    markdown = model_dir / "evaluation.md"
    if OCR_HEADING in markdown.read_text():
        return
    saved = model_dir / OCR_JSON
    if saved.exists():
        report = json.loads(saved.read_text())
    else:
        if not run.get("maps_read"):  # read by an earlier, interrupted run: its figures are in the file
            run = {**run, "seconds": None, "reading_seconds": None}
        report = {"lettered_size": recipe.lettered_size, "run": run, "ocr": score_ocr(db_path, collection),
                  "names": name_search(db_path, collection)}
        saved.write_text(json.dumps(report, indent=2) + "\n")
    with open(markdown, "a") as f:
        f.write(ocr_markdown(report))


def ensure_port_free(port: int):
    """Exit with the reason when another program already listens on the port: the demo would print
    its address while that program answered it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise click.ClickException(f"port {port} is already in use on 127.0.0.1 (another server?): stop it, "
                                       f"or choose another port: make demo PORT={port + 1}") from None


@click.command("demo")
@click.argument("workdir", default="demo", type=click.Path(file_okay=False))
@click.option("--port", default=8001, show_default=True, help="Port for datasette serve.")
@click.option("--no-serve", is_flag=True, help="Build everything, do not start the server.")
def demo_command(workdir, port, no_serve):
    """Build and serve the offline demo under WORKDIR: draw 360 maps (24 of them lettered sheets whose
    printed names OCR reads while the model trains), train a small CLIP on their catalogue captions,
    embed them with it, score OCR and search against what was printed, and serve the search page."""
    workdir = Path(workdir)
    if not no_serve:
        ensure_port_free(port)  # before minutes of building, not after
    db_path = build(workdir)
    if no_serve:
        click.echo(f"demo ready: datasette serve {db_path} -m {workdir / 'metadata.yml'}", err=True)
        return
    ensure_port_free(port)
    click.echo(f"\nServing the demo at http://127.0.0.1:{port}/-/mapclip  (Ctrl-C to stop)\n", err=True)
    served = subprocess.run([sys.executable, "-m", "datasette", "serve", "-i", str(db_path),
                             "-m", str(workdir / "metadata.yml"), "-p", str(port)])
    if served.returncode not in (0, -2, 130):  # Ctrl-C ends it normally
        sys.exit(served.returncode)
