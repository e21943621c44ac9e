"""Soak every read route of a served collection for a long run and report the server's memory growth.

    .venv/bin/python bench/read_routes_soak.py               # 10 minutes, 20,000 maps, 8 clients

Why: a leak that grows with each request (a connection kept alive by the plugin, a cache without a
bound) shows only over thousands of requests.  Builds (once, cached in bench/.cache/) a collection of
synthetic vectors with the ViT-B-32 text encoder (random weights: the same cost as real ones), serves
it with `datasette serve -i` as a published site does, then ``--clients`` clients request routes
drawn evenly from every read route the plugin and Datasette offer on it (Datasette's own pages and
JSON, ``/-/versions.json``, SQL with the mapclip functions, the search page and JSON by text and by
"more like this", map pages in every format, thumbnails, exports, the About page), back to back.
The server's RSS is read after ``--warmup`` seconds and then every 30 s until the end.  Goal: RSS
growth from the end of the warm-up to the end of the run under 2%, and no 5xx.

The result is the "Every read route" section of bench/results/soak.md (the rest of that file is
bench/soak_bench.py's; each script rewrites only its own part).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from search_bench import Server, build_database, memory_of, percentile, random_checkpoint  # noqa: E402
from soak_bench import unique_queries  # noqa: E402

SECTION_START = "<!-- read-routes soak: bench/read_routes_soak.py -->"
SECTION_END = "<!-- /read-routes soak -->"


def routes(rng: random.Random, rows: int, queries: list[str]) -> list[tuple[str, callable]]:
    """(name, () -> path) for every read route; ids and queries drawn afresh for each request."""
    map_id = lambda: rng.randint(1, rows)  # noqa: E731
    text = lambda: queries.pop() if queries else f"map {rng.random()}"  # noqa: E731
    vector = "x'" + "0000803f" * 512 + "'"
    return [
        ("/-/versions.json", lambda: "/-/versions.json"),
        ("/-/plugins.json", lambda: "/-/plugins.json"),
        ("index page", lambda: "/"),
        ("database page", lambda: "/maps"),
        ("table page", lambda: f"/maps/maps?_size=10&id__gte={map_id()}"),
        ("row page", lambda: f"/maps/maps/{map_id()}"),
        ("SQL with mapclip_similarity", lambda: "/maps.json?sql=" + f"select mapclip_similarity({vector}, {vector})"),
        ("search page, text", lambda: f"/-/mapclip?q={text()}&k=10"),
        ("search.json, text", lambda: f"/-/mapclip/search.json?q={text()}&k=10"),
        ("search.json, more like this", lambda: f"/-/mapclip/search.json?like={map_id()}&k=10"),
        ("search.json, filtered", lambda: f"/-/mapclip/search.json?like={map_id()}&year_min=1800&year_max=1900"),
        ("map page", lambda: f"/-/mapclip/map/maps/{map_id()}"),
        ("map page .json", lambda: f"/-/mapclip/map/maps/{map_id()}.json"),
        ("map page .bib", lambda: f"/-/mapclip/map/maps/{map_id()}.bib"),
        ("map page .csl.json", lambda: f"/-/mapclip/map/maps/{map_id()}.csl.json"),
        ("map page .txt", lambda: f"/-/mapclip/map/maps/{map_id()}.txt"),
        ("thumbnail", lambda: f"/-/mapclip/thumbnail/maps/{map_id()}.jpg"),
        ("export.csv", lambda: f"/-/mapclip/export.csv?like={map_id()}&k=20"),
        ("export.json", lambda: f"/-/mapclip/export.json?like={map_id()}&k=20"),
        ("about page", lambda: "/-/mapclip/about"),
    ]


async def soak(url: str, seconds: float, clients: int, rows: int, queries: list[str], seed: int,
               on_tick=None) -> dict:
    """Clients back to back for ``seconds``; -> {route: {"ms": [...], "statuses": {status: n}, "failed": n}}."""
    import httpx

    rng = random.Random(seed)
    table = routes(rng, rows, queries)
    results = {name: {"ms": [], "statuses": {}, "failed": 0} for name, _ in table}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 2)) as client:
        async def visitor():
            while time.perf_counter() < deadline:
                name, path = rng.choice(table)
                started = time.perf_counter()
                try:
                    response = await client.get(path())
                except Exception:
                    results[name]["failed"] += 1
                    continue
                results[name]["ms"].append((time.perf_counter() - started) * 1000)
                statuses = results[name]["statuses"]
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async def ticker():
            while on_tick is not None and time.perf_counter() < deadline:
                await asyncio.sleep(min(30, max(0.0, deadline - time.perf_counter())))
                on_tick()

        await asyncio.gather(ticker(), *[visitor() for _ in range(clients)])
    return results


def replace_section(path: Path, lines: list[str]):
    """Write this script's section of ``path``, leaving the rest of the file as it is."""
    old = path.read_text() if path.exists() else ""
    section = "\n".join([SECTION_START, *lines, SECTION_END])
    if SECTION_START in old and SECTION_END in old:
        before, rest = old.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    else:
        text = old.rstrip("\n") + ("\n\n" if old else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="maps in the collection")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=600, help="length of the measured run")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of requests before the first RSS reading")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (the plugin's default)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "soak.md")
    args = parser.parse_args()
    import datasette
    import httpx
    import torch

    from datasette_mapclip.model.clip import ModelSpec, load_encoder
    from datasette_mapclip.runtime import set_torch_threads

    args.cache.mkdir(parents=True, exist_ok=True)
    checkpoint = random_checkpoint(args.cache)
    served = args.cache / "read-routes" / "maps.db"  # served as "maps"
    if not served.exists():
        set_torch_threads(2)
        encoder = load_encoder(ModelSpec("ViT-B-32", None, str(checkpoint)), precision="fp32")
        print(f"building {served} ...")
        served.parent.mkdir(parents=True, exist_ok=True)
        build_database(served.with_suffix(".tmp.db"), encoder, args.rows, max(100, args.rows // 100))
        shutil.move(served.with_suffix(".tmp.db"), served)
        del encoder

    queries = unique_queries(50_000, 11)
    server = Server(served, args.cache, args.threads)
    samples = []
    try:
        with httpx.Client() as client:
            server.wait(client, "/-/mapclip/search.json?q=warm+up&k=10",
                        lambda r: r.status_code == 200 and r.json().get("searched_with", "").startswith("in-memory"))
        print(f"warm-up {args.warmup:.0f} s ...")
        asyncio.run(soak(server.url, args.warmup, args.clients, args.rows, queries, 1))
        started = time.perf_counter()

        def sample():
            samples.append((time.perf_counter() - started, memory_of(server.process.pid)))
            print(f"  {samples[-1][0]:5.0f} s  RSS {samples[-1][1]['VmRSS']:,.0f} MB", flush=True)

        sample()
        print(f"soak {args.seconds:.0f} s, {args.clients} clients ...")
        results = asyncio.run(soak(server.url, args.seconds, args.clients, args.rows, queries, 2, on_tick=sample))
        sample()
    finally:
        server.stop()

    first, last = samples[0][1]["VmRSS"], samples[-1][1]["VmRSS"]
    growth = (last - first) / first
    total = sum(len(r["ms"]) for r in results.values())
    errors = sum(n for r in results.values() for status, n in r["statuses"].items() if status >= 500)
    failed = sum(r["failed"] for r in results.values())
    lines = [
        "",
        "## Every read route, 10 minutes: memory growth",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/read_routes_soak.py'] + sys.argv[1:])}` on {datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores (client and server share them), Datasette {datasette.__version__}, "
        f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}.",
        "",
        f"{args.rows:,} synthetic maps, ViT-B-32 (random weights), `datasette serve -i`, in-memory index ready, "
        f"torch threads = {args.threads}. {args.clients} clients request routes drawn evenly from the "
        f"{len(results)} below, back to back, for {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up; "
        "RSS is read at the end of the warm-up, every 30 s, and at the end.",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| server RSS growth over the run under 2% | {first:,.0f} MB -> {last:,.0f} MB ({growth:+.2%}) | "
        f"{'PASS' if growth < 0.02 else 'FAIL'} |",
        f"| no 5xx | {errors} of {total:,} requests | {'PASS' if errors == 0 else 'FAIL'} |",
        f"| no failed connections | {failed} | {'PASS' if failed == 0 else 'FAIL'} |",
        "",
        "RSS over the run: " + ", ".join(f"{t:.0f} s {m['VmRSS']:,.0f} MB" for t, m in samples) + ".",
        "",
        "| route | requests | p50 | p95 | statuses |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if r["ms"]:
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(r["statuses"].items()))
            lines.append(f"| {name} | {len(r['ms']):,} | {percentile(r['ms'], 50):.0f} ms | "
                         f"{percentile(r['ms'], 95):.0f} ms | {statuses} |")
    lines += ["", "The synthetic maps have no stored thumbnails: the thumbnail route answers 404 after its permission",
              "check and its read, which is the work a leak would come from."]
    replace_section(args.output, lines)


if __name__ == "__main__":
    main()
