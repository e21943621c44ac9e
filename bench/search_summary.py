"""Gather every search-at-scale result into bench/results/search.md (run by `make bench-search` last).

    .venv/bin/python bench/search_summary.py

search_bench.py writes the 562,842-map table at the top of search.md; the other runs write their
own files (concurrency.md by soak_bench.py, changing.md by changing_bench.py, search-100k.md and
search-2m.md by search_bench.py --rows).  This appends each of them, as it stands, under its own
heading (with the command and date each file records), and the curve across collection sizes, so
one file holds every goal with its PASS/FAIL.  A missing file is named as not run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MARKER = "\n<!-- gathered by bench/search_summary.py -->\n"
SECTIONS = [
    ("concurrency.md", "16 concurrent clients (`bench/soak_bench.py`)"),
    ("changing.md", "A collection that changes while it is served (`bench/changing_bench.py`)"),
]
CURVE = [("100,000", "search-100k.md"), ("562,842", "search.md"), ("2,000,000", "search-2m.md")]
CURVE_ROWS = ["latency p50", "latency p95", "recall@10 vs exact search", "server peak anonymous memory",
              "server memory after the queries (VmRSS)", "of which anonymous", "start-up, cold",
              "start-up, index cached"]


def body(text: str) -> str:
    """A result file without its title line (and without an earlier gathered part)."""
    text = text.split(MARKER)[0]
    return re.sub(r"\A# [^\n]*\n", "", text).strip()


def row_value(text: str, name: str) -> str:
    for line in text.split(MARKER)[0].splitlines():
        if line.startswith("| " + name):
            cells = [c.strip() for c in line.strip("|").split("|")]
            return cells[1] if len(cells) > 1 else ""
    return "not measured"


def filtered_worst(text: str) -> str:
    rows = [line for line in text.split(MARKER)[0].splitlines()
            if re.match(r"\| (years|place|catalogue text) ", line)]
    if not rows:
        return "not measured"
    p50s = [(float(re.findall(r"([\d.]+) ms", r)[0]), r.split("|")[1].strip()) for r in rows]
    worst = max(p50s)
    passed = sum("PASS" in r for r in rows)
    return f"{passed} of {len(rows)} PASS; slowest p50 {worst[0]:.1f} ms ({worst[1]})"


def main():
    target = RESULTS / "search.md"
    if not target.exists():
        sys.exit("run bench/search_bench.py first: it writes the top of bench/results/search.md")
    head = target.read_text().split(MARKER)[0].rstrip() + "\n"
    parts = [MARKER]
    for name, title in SECTIONS:
        path = RESULTS / name
        parts.append(f"\n## {title}\n\nFrom `bench/results/{name}`:\n\n")
        parts.append(body(path.read_text()) + "\n" if path.exists() else "Not run yet.\n")
    texts = {size: (RESULTS / name).read_text() if (RESULTS / name).exists() else "" for size, name in CURVE}
    parts.append("\n## The curve: 100,000 / 562,842 / 2,000,000 maps\n\n")
    parts.append("Each column from its own file (`search-100k.md`, the top of this file, `search-2m.md`: "
                 "`bench/search_bench.py --rows N`); the date and command are in each file. "
                 "Goal at 2,000,000: p50 <= 150 ms unfiltered and filtered, recall@10 >= 0.99, "
                 "memory <= 4 GB with memory-mapped files counted apart.\n\n")
    parts.append("| measure | " + " | ".join(size for size, _ in CURVE) + " |\n")
    parts.append("|---|" + "---|" * len(CURVE) + "\n")
    for name in CURVE_ROWS:
        parts.append(f"| {name} | " + " | ".join(row_value(texts[size], name) if texts[size] else "not run"
                                                  for size, _ in CURVE) + " |\n")
    parts.append("| filtered (9 filters, goal p50 <= 100 ms) | " + " | ".join(
        filtered_worst(texts[size]) if texts[size] else "not run" for size, _ in CURVE) + " |\n")
    for size, name in CURVE:
        match = re.search(r"on (\d{4}-\d\d-\d\d)", texts[size])
        parts.append(f"\n- {size}: `{name}`" + (f", measured {match.group(1)}" if match else ", not run"))
    parts.append("\n")
    target.write_text(head + "".join(parts))
    print(f"gathered into {target}")


if __name__ == "__main__":
    main()
