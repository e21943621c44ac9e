"""Requests per 1,000 items for `mapclip loc-metadata`: search pages (bulk) against the item endpoint.

Run:  .venv/bin/python bench/loc_metadata_bench.py                  (3,000 items, ~10 s on 2 cores)
      .venv/bin/python bench/loc_metadata_bench.py --items 562842    (the paper's collection at loc.gov's
                                                                      own 100,000 cap: ~15 minutes)
Writes bench/results/loc-metadata.md (also printed).  The item path is measured on at most
--item-path-items items (one request per item whatever the size).

Both paths fill the same stored items (as `import-beto` leaves them: item ids, no catalogue fields)
against the local loc.gov stand-in (tests/loc_server.py; nothing leaves this machine), through the
product code (`loaders.sources.loc_catalogue.fill_catalogue`), with the rate limiters off: the
requests are counted at the stand-in, and the time at loc.gov follows from its published limits
(search 80 / minute, item 200 / minute).  To keep the crawl's partitioning overhead like the real
collection's, the stand-in's result cap is scaled with the collection (100,000 results for
562,842 maps, so 533 for 3,000), and item years follow a skewed synthetic spread (most maps
1867-1950, as the Sanborn sheets are) with 1% undated, which no date range returns.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from datasette_mapclip.store import MapStore  # noqa: E402
from datasette_mapclip.store.records import MapRecord  # noqa: E402
from loaders.fetch import Fetcher, RateLimiter  # noqa: E402
from loaders.sources.loc_catalogue import PAGE_SIZE, RESULT_CAP, fill_catalogue  # noqa: E402
from loc_server import LocServer  # noqa: E402

PAPER_MAPS = 562_842
SEARCH_PER_MINUTE = 80  # loc.gov: collections, format and search endpoints
ITEM_PER_MINUTE = 200  # loc.gov: item and resource endpoints
TOOL_ITEM_PER_MINUTE = 60  # this tool's item limiter also keeps 10 / 10 s, which binds first
RESULT = ROOT / "bench" / "results" / "loc-metadata.md"


def synthetic_years(count: int, undated: float, seed: int = 0) -> dict[int, int | None]:
    rng = random.Random(seed)
    years = {}
    for n in range(1, count + 1):
        r = rng.random()
        if r < undated:
            years[n] = None
        elif r < 0.61:
            years[n] = rng.randint(1867, 1950)
        elif r < 0.91:
            years[n] = rng.randint(1750, 2000)
        else:
            years[n] = rng.randint(1500, 1749)
    return years


def stored_items(path: Path, count: int) -> MapStore:
    store = MapStore(path)
    records = [MapRecord(source_id=f"https://tile.example/iiif/m{n}/full/pct:100/0/default.jpg",
                         location=f"https://tile.example/iiif/m{n}/full/!512,512/0/default.jpg", source="beto",
                         item_id=f"testmap{n:04d}", sheet=1) for n in range(1, count + 1)]
    with store.transaction():
        for record in records:
            store.upsert_map(record)
        store.upsert_items(records)
    return store


def run(method: str, count: int, cap: int, years: dict, workdir: Path) -> dict:
    server = LocServer(items=count).start()
    server.years = years
    server.result_cap = cap
    try:
        store = stored_items(workdir / f"{method}.db", count)
        unlimited = Fetcher(RateLimiter([]))
        started = time.perf_counter()
        summary = fill_catalogue(store, unlimited, unlimited, api=server.url, method=method, cap=cap,
                                 progress=False, echo=lambda line: None)
        seconds = time.perf_counter() - started
        filled = store.conn.execute("SELECT count(*) FROM maps WHERE title IS NOT NULL").fetchone()[0]
        store.close()
    finally:
        server.stop()
    pages, items = len(server.page_requests()), len(server.item_requests())
    return {"method": method, "pages": pages, "items": items, "partitions": summary.partitions,
            "filled": filled, "missing": summary.missing, "failed": summary.failed + summary.failed_pages,
            "seconds": seconds}


def hours(search_per_1000: float, item_per_1000: float, item_rate: float = ITEM_PER_MINUTE) -> float:
    thousands = PAPER_MAPS / 1000
    return thousands * (search_per_1000 / SEARCH_PER_MINUTE + item_per_1000 / item_rate) / 60


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=3000, help="stored items to fill (default 3000)")
    parser.add_argument("--undated", type=float, default=0.01, help="share of items without a date (default 0.01)")
    parser.add_argument("--item-path-items", type=int, default=3000,
                        help="items the item path is measured on (default: --items, at most 3000)")
    args = parser.parse_args()
    cap = max(PAGE_SIZE, round(args.items * RESULT_CAP / PAPER_MAPS))
    years = synthetic_years(args.items, args.undated)
    undated = sum(year is None for year in years.values())
    item_count = min(args.items, args.item_path_items)
    with tempfile.TemporaryDirectory() as workdir:
        bulk = run("auto", args.items, cap, years, Path(workdir))
        item = run("item", item_count, cap, synthetic_years(item_count, args.undated), Path(workdir))
    rows = []
    for label, result, count in (("bulk (default, `--method auto`)", bulk, args.items),
                                 ("item endpoint (`--method item`)", item, item_count)):
        search_k, item_k = 1000 * result["pages"] / count, 1000 * result["items"] / count
        rows.append((label, result, count, search_k, item_k, hours(search_k, item_k)))
    bulk_row, item_row = rows
    lines = [
        "# `mapclip loc-metadata`: requests per 1,000 items, and the paper's collection at loc.gov's limits",
        "",
        "Command: `.venv/bin/python bench/loc_metadata_bench.py` "
        f"(`--items {args.items} --undated {args.undated} --item-path-items {args.item_path_items}`), "
        f"{os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"{args.items:,} stored items without catalogue fields, filled against the local loc.gov stand-in "
        f"(tests/loc_server.py) through the product code with the rate limiters off; requests counted at the "
        f"stand-in. Result cap scaled like the real one (100,000 for 562,842 maps): {cap:,}. "
        f"{undated} items ({undated / args.items:.1%}) undated; years otherwise skewed to 1867-1950.",
        "",
        "| path | search pages | partitions | item requests | filled | search / item requests per 1,000 items "
        "| projected for 562,842 maps (80 search, 200 item requests a minute) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, result, count, search_k, item_k, projected in rows:
        lines.append(f"| {label} | {result['pages']:,} | {result['partitions']} | {result['items']:,} | "
                     f"{result['filled']:,} of {count:,} | {search_k:.2f} / {item_k:.2f} | "
                     f"**{projected:.1f} hours** |")
    speedup = item_row[5] / bulk_row[5]
    lines += [
        "",
        f"- Bulk: {bulk_row[3]:.2f} search pages per 1,000 items ({1000 * (args.items - undated) / 150 / args.items:.2f}"
        f" is the floor: the dated items at 150 a page; the rest is partitioning: split probes, empty date "
        f"ranges and part-filled last pages), "
        f"{hours(bulk_row[3], 0) * 60:.0f} minutes, plus {bulk_row[4]:.1f} item requests per 1,000 for the "
        f"undated items, {hours(0, bulk_row[4]) * 60:.0f} minutes: {bulk_row[5] * 60:.0f} minutes for 562,842 "
        f"maps, {speedup:.0f}x less than the item endpoint.",
        f"- Item endpoint: one request per item, {item_row[5]:.1f} hours at loc.gov's published 200 a minute; "
        f"this tool's item limiter also keeps the older 10 / 10 s burst rule, which caps it at 60 a minute "
        f"({hours(0, item_row[4], TOOL_ITEM_PER_MINUTE):.0f} hours). The bulk path's item requests cost "
        f"{hours(0, bulk_row[4], TOOL_ITEM_PER_MINUTE) * 60 - hours(0, bulk_row[4]) * 60:.0f} more minutes at "
        "that rate.",
        "- Assumptions: each of the 562,842 maps counts as one catalogue item (sheets of an atlas share one, so "
        "this is an upper bound), the search holds just those items (a larger search costs proportionally more "
        "pages), and pages arrive faster than the limiter lets them go (4 in flight, `--workers`). The cap is "
        "scaled with the collection, so a small run has as many partitions as the real crawl but far fewer pages "
        "in each: its overhead per 1,000 items is an upper bound.",
        f"- Wall time against the stand-in, limiters off: bulk {bulk['seconds']:.1f} s, item {item['seconds']:.1f} s "
        "(local work: matching and writing are not the bottleneck).",
        f"- Missing / failed: bulk {bulk['missing']} / {bulk['failed']}, item {item['missing']} / {item['failed']}.",
    ]
    text = "\n".join(lines) + "\n"
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    print(text)
    if bulk["filled"] != args.items or item["filled"] != item_count:
        sys.exit("not every item was filled: see the table")


if __name__ == "__main__":
    main()
