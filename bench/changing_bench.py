"""Searching a collection that changes while it is served (Datasette's mutable mode).

    .venv/bin/python bench/changing_bench.py                 # 100,000 vectors, 150 s
    .venv/bin/python bench/changing_bench.py --db bench/.cache/search-562842-catalogue.db
                            # Library of Congress scale, from a copy of the search benchmark's collection

What it does, and why:
1. Builds (once, cached in bench/.cache/) a synthetic collection as bench/search_bench.py does, and
   serves a fresh copy of it with `datasette serve` *without* `-i`, at Datasette's default 1 s
   SQL time limit, until the in-memory index is ready.
2. For --seconds, this process edits a map's title every 2.5 s and appends 16 new maps (vectors
   near existing ones, through MapStore.write_batch as the loaders write) every 30 s, while a
   client sends searches back to back (text queries and "more like this" of random maps), and
   asks for each appended map with `like=<id>` until it is among its own results.
3. Reports failed searches, latency, how long each appended map took to become findable, and
   the index cache on disk against one float32 copy of the vectors; writes bench/results/changing.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from search_bench import (  # noqa: E402
    KINDS,
    PLACES,
    QUERY_WORDS,
    Server,
    build_database,
    memory_of,
    percentile,
    random_checkpoint,
    write_report,
)

from datasette_mapclip.search.index import quick_state, read_state  # noqa: E402
from datasette_mapclip.store import MapStore, connect  # noqa: E402
from datasette_mapclip.store.records import MapRecord  # noqa: E402
from datasette_mapclip.store.vectors import normalise  # noqa: E402


class MutableServer(Server):
    """search_bench's server, but serving the file mutable (no -i) at Datasette's default time limit."""

    def __init__(self, db: Path, cache_dir: Path, threads: int):
        self.port = __import__("search_bench").free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        metadata = {"plugins": {"datasette-mapclip": {"threads": threads, "index_dir": str(cache_dir)}}}
        self.metadata_path = cache_dir / "changing-metadata.json"
        self.metadata_path.write_text(json.dumps(metadata))
        self.started = time.perf_counter()
        self.log = open(cache_dir / "changing-server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "datasette", "serve", str(db), "-m", str(self.metadata_path), "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT)

# The index is ready when an unfiltered search is answered by its final first stage (fast-scan codes
# from fast_scan_min_rows maps, built after the int8 codes serve; int8 codes below), not by the
# exact scans of the cache a restart answers with first.
READY = ("in-memory fast-scan + exact re-scoring", "in-memory int8 + exact re-scoring")


def cache_bytes(cache_dir: Path, db: Path) -> tuple[int, int]:
    """(bytes, folders) of the index caches of ``db`` in ``cache_dir``."""
    total, folders = 0, 0
    for folder in cache_dir.glob(f"{db.name}.*mapclip-index*"):
        folders += 1
        for path in folder.rglob("*") if folder.is_dir() else [folder]:
            try:
                total += path.stat().st_size
            except OSError:
                pass
    return total, folders


def time_checks(db: Path, table: str) -> dict:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out = {}
    for name, fn in (("quick", quick_state), ("full", read_state)):
        fn(conn, table)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn(conn, table)
            times.append((time.perf_counter() - t) * 1000)
        out[name] = float(np.median(times))
    conn.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--edit-every", type=float, default=2.5)
    parser.add_argument("--append-every", type=float, default=30)
    parser.add_argument("--append", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per encode in the server")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--db", type=Path, help="serve a copy of this collection (e.g. the search benchmark's) "
                                                "instead of building one of --rows maps")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "changing.md")
    args = parser.parse_args()
    import httpx

    args.cache.mkdir(parents=True, exist_ok=True)
    pristine = args.db or args.cache / f"changing-{args.rows}.db"
    if not pristine.exists():

        from datasette_mapclip.model.clip import ModelSpec, load_encoder

        checkpoint = random_checkpoint(args.cache)
        encoder = load_encoder(ModelSpec("ViT-B-32", None, str(checkpoint)), precision="fp32")
        print(f"building {pristine} ...")
        build_database(pristine.with_suffix(".tmp.db"), encoder, args.rows, args.clusters)
        shutil.move(pristine.with_suffix(".tmp.db"), pristine)
        del encoder
    work = args.cache / "changing" / "maps.db"
    shutil.rmtree(work.parent, ignore_errors=True)
    work.parent.mkdir(parents=True)
    shutil.copy(pristine, work)

    store = MapStore(work)
    model = store.model()
    table, dim = model["vector_table"], int(model["dim"])
    ids = [row[0] for row in store.conn.execute("SELECT id FROM maps ORDER BY id")]
    checks = time_checks(work, table)
    one_copy = len(ids) * dim * 4
    rng = np.random.default_rng(7)

    server = MutableServer(work, work.parent, args.threads)
    lock = threading.Lock()
    appended: dict[int, float] = {}   # map id -> when it was committed
    findable: dict[int, float] = {}   # map id -> seconds until like=<id> found it
    latencies, failures, behind, searched_with, max_cache = [], [], 0, set(), [0, 0]
    stop = threading.Event()
    with httpx.Client(timeout=60) as client:
        up, _ = server.wait(client, "/-/versions.json")
        ready, _ = server.wait(client, "/-/mapclip/search.json?q=warm+up&k=10",
                               lambda r: r.status_code == 200 and r.json().get("searched_with", "") in READY)
        print(f"server answering after {up:.1f} s, index ready after {ready:.1f} s")

        def writer():
            started = time.monotonic()
            next_edit, next_append, batch = started, started + args.append_every / 3, 0
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_edit:
                    map_id = int(rng.choice(ids))
                    with store.transaction():
                        store.conn.execute("UPDATE maps SET title = ? WHERE id = ?", (f"Edited at {now:.1f}", map_id))
                    next_edit += args.edit_every
                if now >= next_append:
                    near = np.array([store.conn.execute(f"SELECT embedding FROM [{table}] WHERE map_id = ?",
                                                        (int(i),)).fetchone()[0] for i in rng.choice(ids, args.append)])
                    base = np.frombuffer(b"".join(near), "<f4").reshape(-1, dim)
                    matrix = normalise(base + 0.02 * rng.standard_normal(base.shape)).astype(np.float32)
                    records = [MapRecord(source_id=f"appended:{batch}:{i}", location=f"appended:{batch}:{i}",
                                         source="bench", title=f"Appended map {batch}-{i}") for i in range(args.append)]
                    store.write_batch(model, records, matrix)
                    committed = time.monotonic()
                    new = [store.conn.execute("SELECT id FROM maps WHERE source_id = ?", (r.source_id,)).fetchone()[0]
                           for r in records]
                    with lock:
                        appended.update({i: committed for i in new})
                    batch += 1
                    next_append += args.append_every
                size = cache_bytes(work.parent, work)
                max_cache[0], max_cache[1] = max(max_cache[0], size[0]), max(max_cache[1], size[1])
                stop.wait(0.1)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        deadline = time.monotonic() + args.seconds
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            with lock:
                pending = [i for i in appended if i not in findable]
            if pending and turn % 2 == 0:
                map_id = pending[turn // 2 % len(pending)]
                query = {"like": map_id, "k": 10}
            elif turn % 3:
                words = " ".join(rng.choice(QUERY_WORDS, size=2, replace=False))
                query = {"q": f"{words} {rng.choice(KINDS)} of {rng.choice(PLACES)}", "k": 10}
            else:
                query = {"like": int(rng.choice(ids)), "k": 10}
            t = time.perf_counter()
            try:
                response = client.get(server.url + "/-/mapclip/search.json?" + urllib.parse.urlencode(query))
                status = response.status_code
            except Exception as error:
                status = repr(error)
            elapsed = (time.perf_counter() - t) * 1000
            latencies.append(elapsed)
            if status != 200:
                failures.append((status, query, getattr(response, "text", "")[:200]))
                continue
            data = response.json()
            searched_with.add(data["searched_with"].split(" (")[0])
            behind += bool(data.get("index_behind"))
            if "like" in query and query["like"] in appended and query["like"] in [r["id"] for r in data["results"]]:
                with lock:
                    findable.setdefault(query["like"], time.monotonic() - appended[query["like"]])
        # the maps of the last append may still be on their way: give them a bounded wait
        settle = time.monotonic() + 60
        while time.monotonic() < settle:
            with lock:
                pending = [i for i in appended if i not in findable]
            if not pending:
                break
            for map_id in pending:
                data = client.get(server.url + f"/-/mapclip/search.json?like={map_id}&k=10").json()
                if map_id in [r["id"] for r in data.get("results", [])]:
                    findable.setdefault(map_id, time.monotonic() - appended[map_id])
            time.sleep(0.25)
        stop.set()
        thread.join()
        memory = memory_of(server.process.pid)
        server.stop()
    store.close()
    final_rows = len(ids) + len(appended)
    final_cache, final_folders = cache_bytes(work.parent, work)
    conn = connect(work)
    state = read_state(conn, table)
    conn.close()

    waits = sorted(findable.values())
    never = len(appended) - len(findable)
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    worst_wait = max(waits) if waits else float("nan")
    ratio_end = final_cache / (final_rows * dim * 4)
    ratio_max = max_cache[0] / one_copy

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    lines = [
        "# Changing-collection benchmark: searching while the collection is edited and grows",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/changing_bench.py'] + sys.argv[1:])}` on {datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}.",
        "",
        f"{len(ids):,} synthetic unit vectors ({dim}-d, as bench/search_bench.py builds them), served by"
        f" `datasette serve` in mutable mode (no `-i`, default 1 s SQL time limit, torch threads = {args.threads}).",
        f" For {args.seconds:.0f} s this process edited a title every {args.edit_every} s and appended"
        f" {args.append} maps every {args.append_every:.0f} s (MapStore.write_batch), while one client searched back to back"
        f" (text queries, `like` of random maps, and `like` of each appended map until it found itself).",
        "",
        "| measure | value | goal | |",
        "|---|---|---|---|",
        f"| searches | {len(latencies):,} | | |",
        f"| failed searches (not 200) | {len(failures)} | 0 | {verdict(not failures)} |",
        f"| latency p50 | {p50:.1f} ms | | |",
        f"| latency p95 | {p95:.1f} ms | <= 200 ms | {verdict(p95 <= 200)} |",
        f"| searches answered while the index was behind (`index_behind`) | {behind} | | |",
        f"| searched with | {', '.join(sorted(searched_with))} | | |",
        f"| appended maps | {len(appended)} | | |",
        f"| appended map findable by `like` after: median / worst | "
        f"{(np.median(waits) if waits else float('nan')):.1f} s / {worst_wait:.1f} s | <= 60 s | "
        f"{verdict(not never and worst_wait <= 60)} |",
        f"| appended maps never findable | {never} | 0 | {verdict(not never)} |",
        f"| index cache on disk at the end / one float32 copy | {final_cache / 1e6:,.1f} MB / {final_rows * dim * 4 / 1e6:,.1f} MB"
        f" = {ratio_end:.2f}x ({final_folders} folder) | <= 1.3x | {verdict(ratio_end <= 1.3 and final_folders == 1)} |",
        f"| largest cache seen during the run | {max_cache[0] / 1e6:,.1f} MB = {ratio_max:.2f}x of the start's copy,"
        f" {max_cache[1]} folder(s) | | |",
        f"| the change check at {len(ids):,} rows: quick (every search, <= 2/s, when the file changed) / full (background) |"
        f" {checks['quick']:.3f} ms / {checks['full']:.1f} ms | ~1 ms | {verdict(checks['quick'] <= 1)} |",
        f"| server peak memory (VmHWM) / at the end (VmRSS) | {memory.get('VmHWM', 0):,.0f} MB / {memory.get('VmRSS', 0):,.0f} MB | | |",
        f"| vector state at the end | {state.count:,} vectors, {state.version:,} vector writes, {state.rewrites} rewrites | | |",
        "",
        f"Server answering after {up:.1f} s, in-memory index ready after {ready:.1f} s (cold build of the cache).",
    ]
    if failures:
        lines += ["", "First failures:", ""] + [f"- {status}: {query} {text!r}" for status, query, text in failures[:5]]
    write_report(args.output, lines)


if __name__ == "__main__":
    main()
