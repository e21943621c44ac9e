"""Which fusion ranks a text + image query best: precision@12 by map kind on the offline demo.

    .venv/bin/python bench/fusion_bench.py                 # reuses ./demo if built, else builds it
    .venv/bin/python bench/fusion_bench.py --demo DIR      # a demo folder (built there if missing)

For every ordered pair of the demo's kinds (text: kind A's plain query, "nautical chart"; image:
a map of kind B, as ``like``, its stored vector) and slider weights -1, -0.5, 0, 0.5, 1, each
fusion method (``average``, the paper's vector average; ``standardised``; ``rrf``) runs the
search and the top 12 are counted by kind (the demo's metadata.csv knows each map's kind).
Writes bench/results/fusion.md.  The figures are counts of maps, so they do not depend on how
busy the machine is.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasette_mapclip.search.local import Collection  # noqa: E402
from fine_tune.demo.run import DEMO_VERSION, VERSION_FILE  # noqa: E402
from fine_tune.kinds import KINDS  # noqa: E402

METHODS = ("average", "standardised", "rrf")
WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
TOP = 12
IMAGES_PER_KIND = 3  # the first maps of each kind, by id, serve as the image
AT_LEAST = 4  # "both asked kinds in the top 12": at least this many of each at the middle


def demo_database(folder: Path) -> Path:
    """The demo's database, built first when the folder has none of this demo version."""
    built = (folder / VERSION_FILE).is_file() and (folder / VERSION_FILE).read_text().strip() == DEMO_VERSION
    if not (built and (folder / "demo.db").is_file()):
        subprocess.run([sys.executable, "-m", "fine_tune.demo", str(folder), "--no-serve"], cwd=ROOT, check=True)
    return folder / "demo.db"


def kinds_of(folder: Path) -> dict[str, str]:
    """item id -> kind, from the demo's own truth."""
    with open(folder / "collection" / "metadata.csv", newline="") as f:
        return {row["item_id"]: row["kind"] for row in csv.DictReader(f)}


def run(folder: Path) -> dict:
    db_path = demo_database(folder)
    kind_of_item = kinds_of(folder)
    counts = defaultdict(list)  # (method, weight) -> [(text kind count, image kind count, both >= AT_LEAST)]
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    kind_of = {map_id: kind_of_item.get(item) for map_id, item in conn.execute("SELECT id, item_id FROM maps")}
    conn.close()
    with Collection(db_path, settings={"index": "auto"}) as maps:
        images = {kind: sorted(i for i, k in kind_of.items() if k == kind)[:IMAGES_PER_KIND] for kind in KINDS}
        for text_kind, query in KINDS.items():
            for image_kind, image_ids in images.items():
                if image_kind == text_kind:
                    continue
                for image_id in image_ids:
                    for method in METHODS:
                        for weight in WEIGHTS:
                            answer = maps.search(query, like=image_id, weight=weight, fusion=method, k=TOP)
                            kinds = [kind_of.get(r["id"]) for r in answer["results"]]
                            a, b = kinds.count(text_kind), kinds.count(image_kind)
                            counts[method, weight].append((a, b, a >= AT_LEAST and b >= AT_LEAST))
    return counts


def report(counts: dict, folder: Path) -> str:
    queries = len(counts[METHODS[0], 0.0])
    lines = [
        "# Fusing a text and an image: precision@12 by map kind on the demo",
        "",
        f"`.venv/bin/python bench/fusion_bench.py` on {datetime.date.today()}, demo in `{folder.name}/` "
        f"(360 maps, 8 kinds). Every ordered pair of kinds: the text is kind A's plain query, the image one of the "
        f"first {IMAGES_PER_KIND} maps of kind B (`like`); {queries} queries per method and slider weight. "
        "These are counts of maps, so they do not depend on how busy the machine was.",
        "",
        "Mean maps of each asked kind in the top 12 (A: the text's kind, B: the image's kind), and the share of "
        f"queries with at least {AT_LEAST} of each:",
        "",
        "| method | slider | A in top 12 | B in top 12 | precision@12 (A or B) | both kinds >= 4 |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for weight in WEIGHTS:
            rows = counts[method, weight]
            a = sum(r[0] for r in rows) / len(rows)
            b = sum(r[1] for r in rows) / len(rows)
            both = sum(r[2] for r in rows) / len(rows)
            lines.append(f"| {method} | {weight:+.1f} | {a:.1f} | {b:.1f} | {(a + b) / TOP:.2f} | {both:.0%} |")
    middle = {m: sum(r[2] for r in counts[m, 0.0]) / queries for m in METHODS}
    best = max(METHODS, key=lambda m: (middle[m], sum(sum(r[0] + r[1] for r in counts[m, w]) for w in WEIGHTS)))
    lines += [
        "",
        f"At the slider's middle (0), both asked kinds are in the top 12 (at least {AT_LEAST} of each) for "
        + ", ".join(f"{middle[m]:.0%} of queries with {m}" for m in METHODS) + ".",
        "",
        f"Chosen as the search page's default: **{best}** (the most queries with both kinds at the middle).",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="the demo folder (built if missing)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "fusion.md")
    args = parser.parse_args()
    text = report(run(args.demo), args.demo)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
