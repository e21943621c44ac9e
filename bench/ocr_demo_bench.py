"""OCR readers on the demo's lettered sheets: `mapclip ocr`'s reader at its defaults and with other
settings, against RapidOCR's one-call defaults, on two draws of the sheets.  Writes
bench/results/ocr-demo.md (also printed).

    .venv/bin/python bench/ocr_demo_bench.py                  # draws 0 (the demo's) and 1, every reader
    .venv/bin/python bench/ocr_demo_bench.py --draws 0 --readers mapclip,rapidocr-defaults

The demo's lettered sheets (``fine_tune/demo``: 24 sheets of 1,024 px, three of each kind, names over
coastlines, street grids, strata and hatching, faint, rotated, vertical and curved) are busier than
bench/ocr_bench.py's plain ones, and they are the sheets `make demo`'s evaluation scores.  Draw 0 is
the demo's own collection; draw 1 is the same drawer with another seed (other pictures, other places
for the names), so a setting chosen on one draw can be checked on the other.  Scoring is the demo
evaluation's (``fine_tune.demo.lettering.score_sheet``): a reading belongs to the label whose bounds
cover most of it; words are compared case-, accent- and punctuation-folded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fine_tune.demo.lettering import GROUPS, NO_LABEL, Tally, read_truth, score_sheet, summarise  # noqa: E402
from fine_tune.demo.maps import generate_demo_collection  # noqa: E402
from fine_tune.demo.run import RECIPE  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from ocr_bench import mapclip_engine, rapidocr_defaults  # noqa: E402  (the same readers as the plain sheets')


def as_readings(engine):
    """bench/ocr_bench.py's engine (image -> ``Read``s) as the demo's scoring takes readings: (text, box)."""
    return lambda image: [(read.text, tuple(float(v) for v in read.box)) for read in engine(image)]


READERS = {
    "mapclip": lambda threads: as_readings(mapclip_engine(threads)),
    "mapclip-scale1.5": lambda threads: as_readings(mapclip_engine(threads, detect_scale=1.5)),
    "mapclip-unclip1.6": lambda threads: as_readings(mapclip_engine(threads, unclip_ratio=1.6)),
    "mapclip-no-respace": lambda threads: as_readings(mapclip_engine(threads, respace=False)),
    "mapclip-no-turned-check": lambda threads: as_readings(mapclip_engine(threads, check_turned=False)),
    "rapidocr-defaults": lambda threads: as_readings(rapidocr_defaults(threads)),
}


def draw(folder: Path, seed: int) -> dict[str, list]:
    """The demo's lettered sheets of draw ``seed`` in ``folder`` (the whole collection is drawn: which maps
    are lettered follows from it); file -> its labels."""
    generate_demo_collection(folder, count=RECIPE.count, seed=seed, size=RECIPE.size,
                             lettered_per_kind=RECIPE.lettered_per_kind, lettered_size=RECIPE.lettered_size)
    return read_truth(folder)


def figures(tallies: dict[str, Tally]) -> dict:
    summary = summarise(tallies)
    return {"h14": summary["horizontal_14"], "rotated": summary["rotated_curved"], "all": summary["all"]}


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", default="0,1", help="seeds of the demo collection to draw (0: the demo's own)")
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ocr-demo.md"))
    args = parser.parse_args(argv)
    draws = [int(d) for d in args.draws.split(",")]
    names = args.readers.split(",")
    unknown = [name for name in names if name not in READERS]
    if unknown:
        parser.error(f"unknown readers {unknown}; known: {', '.join(READERS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ocr-demo-bench-") as tmp:
        for seed in draws:
            folder = Path(tmp) / f"draw-{seed}"
            truth = draw(folder, seed)
            images = {file: Image.open(folder / file).convert("RGB") for file in truth}
            for name in names:
                read = READERS[name](args.threads)
                read(next(iter(images.values())).crop((0, 0, 320, 240)))  # warm-up: model loading is not per sheet
                tallies = {group: Tally() for group in [*GROUPS, NO_LABEL]}
                seconds = []
                for file, labels in truth.items():
                    started = time.perf_counter()
                    readings = read(images[file])
                    seconds.append(time.perf_counter() - started)
                    for group, tally in score_sheet(labels, readings).items():
                        tallies[group].add(tally)
                row = {"draw": seed, "reader": name, "sheets": len(truth), "seconds": float(np.median(seconds)),
                       **figures(tallies)}
                rows.append(row)
                print(f"draw {seed} {name}: horizontal >= 14 px {fmt(row['h14']['recall'])} / "
                      f"{fmt(row['h14']['precision'])}, rotated or curved {fmt(row['rotated']['recall'])}, "
                      f"{row['seconds']:.2f} s/sheet", flush=True)
    text = render(args, rows)
    Path(args.out).write_text(text)
    print(text)


def render(args, rows) -> str:
    from importlib.metadata import version

    import onnxruntime

    command = "python bench/ocr_demo_bench.py" + ("".join(f" {a}" for a in sys.argv[1:]))
    lines = [
        "# OCR on the demo's lettered sheets",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, onnxruntime "
        f"{onnxruntime.__version__}, rapidocr {version('rapidocr')} (PP-OCRv6 small det/rec, PP-OCR mobile v2 cls); "
        f"{args.threads} threads per reader",
        f"- command: `.venv/bin/{command}`",
        f"- sheets: the demo's {RECIPE.lettered_per_kind * 8} lettered sheets of {RECIPE.lettered_size} x "
        f"{RECIPE.lettered_size} px per draw; draw 0 is the demo's own collection, draw 1 the same drawer "
        "with seed 1",
        "",
        "Word recall / precision (the demo evaluation's scoring). Horizontal >= 14 px includes the faint "
        "names and those over hatching; rotated or curved includes vertical names.",
        "",
        "| draw | reader | horizontal >= 14 px: recall / precision | rotated or curved: recall | all: recall / "
        "precision | s/sheet (median) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        h14, rotated, every = row["h14"], row["rotated"], row["all"]
        lines.append(f"| {row['draw']} | {row['reader']} | {fmt(h14['recall'])} / {fmt(h14['precision'])} "
                     f"({h14['found_words']} of {h14['truth_words']}) | {fmt(rotated['recall'])} | "
                     f"{fmt(every['recall'])} / {fmt(every['precision'])} | {row['seconds']:.2f} |")
    lines += ["", "Readers: `mapclip` is `mapclip ocr`'s reader at its defaults; the `mapclip-` variants change one "
              "setting (`OcrSettings`); `rapidocr-defaults` is RapidOCR's one-call API as the library ships.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
