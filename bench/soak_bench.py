"""Load and soak: many clients against `datasette serve`, with and without a stream of hostile requests.

    .venv/bin/python bench/soak_bench.py                  # 32 clients, 60 s per phase, 100,000 maps

What it does, and why:
1. Builds (once, cached in bench/.cache/) a collection of synthetic vectors with the ViT-B-32 text
   encoder (random weights: the same cost as real ones), as bench/search_bench.py does, and starts
   `datasette serve -i` on it with the in-memory index ready (the state a published site is in).
2. Warm-up, then phase "normal": 32 clients for 60 s, each sending one request after another:
   text search 50% (unique queries), "more like this" 30%, image upload 20% (a map-like JPEG).
   A probe asks for "more like this" and `/-/versions.json` every 250 ms, from a process of its own.
3. Phase "hostile": the same, plus clients (in another process, at nice 19, since an attacker's CPU
   is not the server's) that send the most hostile requests the plugin must
   refuse, back to back: 150,000-part multipart bodies (9 MB), bodies past the upload cap,
   decompression-bomb PNGs, 50 MB of text as `q` in a form and 1 MB in the URL, ids past
   64 bits, malformed multipart, a CSRF cookie with a hostile body, and a broken JPEG.
4. Reports requests/s, p50/p95 per kind, the count of 5xx (goal 0) and of failed connections, the
   server's RSS after the warm-up and at the end (goal: no growth), and the p95 of the probe's
   "more like this" and `/-/versions.json` in each phase (goal: hostile within 2x of normal).
   Results go to bench/results/soak.md.

The client runs on the same cores as the server (2 here): its cost is part of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

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

from datasette_mapclip.model.clip import ModelSpec, load_encoder  # noqa: E402
from datasette_mapclip.runtime import set_torch_threads  # noqa: E402

MIX = [("text", 0.5), ("like", 0.3), ("upload", 0.2)]

# The index is ready when an unfiltered search is answered by its final first stage (fast-scan codes
# from fast_scan_min_rows maps, built after the int8 codes serve; int8 codes below), not by the
# exact scans of the cache a restart answers with first.
READY = ("in-memory fast-scan + exact re-scoring", "in-memory int8 + exact re-scoring")


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``text=0.5,like=0.5`` -> [("text", 0.5), ("like", 0.5)]"""
    pairs = [part.split("=") for part in text.split(",") if part]
    mix = [(name.strip(), float(weight)) for name, weight in pairs]
    unknown = {name for name, _ in mix} - {"text", "like", "upload"}
    if unknown:
        raise SystemExit(f"--mix: unknown kinds {sorted(unknown)} (text, like, upload)")
    return mix


def map_jpeg(seed: int, size=(1200, 900)) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", size, (rng.randint(200, 240), rng.randint(190, 230), rng.randint(160, 200)))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.rectangle([x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 140)],
                       outline=(40, 40, 90), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=88)
    return out.getvalue()


def multipart(fields: dict, file: bytes | None = None, boundary: str = "soakboundary") -> tuple[bytes, str]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    if file is not None:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="m.jpg"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + file + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hostile_requests() -> list[tuple[str, str, dict]]:
    """(name, method + path, httpx keyword arguments): what an attacker sends, built once."""
    from PIL import Image

    parts = b'--hb\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n' * 150_000 + b"--hb--\r\n"
    many_parts = {"content": parts, "headers": {"content-type": "multipart/form-data; boundary=hb"}}
    bomb = io.BytesIO()
    Image.new("1", (30000, 20000)).save(bomb, "PNG")
    too_big, ctype = multipart({}, b"\xff\xd8" + os.urandom(11 * 1024 * 1024))
    bomb_body, bomb_type = multipart({}, bomb.getvalue())
    broken, broken_type = multipart({}, map_jpeg(1)[:5000])
    huge_q, huge_q_type = multipart({"q": "a" * 50_000_000})
    return [
        ("150k parts", "POST /-/mapclip/search.json", many_parts),
        ("150k parts + csrf cookie", "POST /-/mapclip",
         {**many_parts, "headers": {**many_parts["headers"], "cookie": "ds_csrftoken=x"}}),
        ("11 MB upload", "POST /-/mapclip/search.json", {"content": too_big, "headers": {"content-type": ctype}}),
        ("pixel bomb", "POST /-/mapclip/search.json", {"content": bomb_body, "headers": {"content-type": bomb_type}}),
        ("broken jpeg", "POST /-/mapclip/search.json", {"content": broken, "headers": {"content-type": broken_type}}),
        ("malformed multipart", "POST /-/mapclip/search.json",
         {"content": b"--x\r\nnonsense" * 1000, "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("50 MB q in a form", "POST /-/mapclip/search.json", {"content": huge_q, "headers": {"content-type": huge_q_type}}),
        ("1 MB q in the URL", "GET /-/mapclip/search.json?q=" + "a" * 1_000_000, {}),
        ("id past 64 bits", "GET /-/mapclip/search.json?like=99999999999999999999999", {}),
        ("thumbnail past 64 bits", "GET /-/mapclip/thumbnail/maps/99999999999999999999999.jpg", {}),
        ("long q", "GET /-/mapclip/search.json?q=" + "map " * 5000, {}),
    ]


class Recorder:
    def __init__(self):
        self.latencies: dict[str, list[float]] = {}
        self.statuses: dict[str, dict[int, int]] = {}
        self.failures: dict[str, int] = {}
        self.elapsed = 0.0

    def add(self, kind: str, status: int | None, seconds: float):
        if status is None:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            return
        self.latencies.setdefault(kind, []).append(seconds * 1000)
        counts = self.statuses.setdefault(kind, {})
        counts[status] = counts.get(status, 0) + 1

    def server_errors(self, kind=None) -> int:
        return sum(n for k, counts in self.statuses.items() if kind in (None, k)
                   for status, n in counts.items() if status >= 500)


async def timed(client, recorder: Recorder, kind: str, method: str, url: str, **kwargs):
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
        recorder.add(kind, response.status_code, time.perf_counter() - started)
        return response
    except Exception:  # a dropped connection counts as a failure, never as a success
        recorder.add(kind, None, time.perf_counter() - started)
        return None


def wait_until(start_at: float):
    time.sleep(max(0.0, start_at - time.time()))


async def visitors(url: str, seconds: float, clients: int, queries, uploads, like_ids, seed: int,
                   mix=MIX) -> Recorder:
    """The normal mix: ``clients`` clients sending requests back to back."""
    import httpx

    load = Recorder()
    deadline = time.perf_counter() + seconds
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 2)) as client:
        async def visitor():
            while time.perf_counter() < deadline:
                kind = rng.choices([k for k, _ in mix], [w for _, w in mix])[0]
                if kind == "text":
                    await timed(client, load, kind, "GET", "/-/mapclip/search.json",
                                params={"q": queries.pop() if queries else f"map {rng.random()}", "k": 10})
                elif kind == "like":
                    await timed(client, load, kind, "GET", "/-/mapclip/search.json",
                                params={"like": rng.choice(like_ids), "k": 10})
                else:
                    body, content_type = multipart({"k": "10"}, rng.choice(uploads))
                    await timed(client, load, kind, "POST", "/-/mapclip/search.json", content=body,
                                headers={"content-type": content_type})

        started = time.perf_counter()
        await asyncio.gather(*[visitor() for _ in range(clients)])
        load.elapsed = time.perf_counter() - started
    return load


def attack_process(url: str, start_at: float, seconds: float, clients: int) -> Recorder:
    """Hostile clients, in a process of their own so their cost never delays the others' timing."""
    import httpx

    # The attackers' own CPU (building and sending 50 MB bodies) would be on their machines, not the
    # server's; here they share its 2 cores, so they run at the lowest priority.
    os.nice(19)
    hostile = hostile_requests()
    attacks = Recorder()

    async def run():
        deadline = time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def attacker(i):
                while time.perf_counter() < deadline:
                    name, target, kwargs = hostile[i % len(hostile)]
                    method, path = target.split(" ", 1)
                    await timed(client, attacks, name, method, path, **kwargs)
                    i += 1

            await asyncio.gather(*[attacker(i) for i in range(clients)])

    wait_until(start_at)
    asyncio.run(run())
    return attacks


def probe_process(url: str, start_at: float, seconds: float, like_ids) -> Recorder:
    """One "more like this" and one /-/versions.json every 250 ms, timed in a process of its own."""
    import httpx

    probe = Recorder()
    rng = random.Random(5)
    wait_until(start_at)
    deadline = time.perf_counter() + seconds
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.perf_counter() < deadline:
            for kind, path, params in (("more like this", "/-/mapclip/search.json", {"like": rng.choice(like_ids), "k": 10}),
                                       ("/-/versions.json", "/-/versions.json", {})):
                started = time.perf_counter()
                try:
                    status = client.get(path, params=params).status_code
                except Exception:
                    status = None
                probe.add(kind, status, time.perf_counter() - started)
            time.sleep(0.25)
    return probe


def run_phase(url: str, seconds: float, clients: int, hostile_clients: int, queries, uploads, like_ids, seed=0,
              mix=MIX):
    """-> (normal mix, hostile, probe) recorders; each part runs in its own process."""
    import concurrent.futures
    import multiprocessing

    start_at = time.time() + 8  # time for the other processes to start and build their requests
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        probe = pool.submit(probe_process, url, start_at, seconds, like_ids)
        attacks = pool.submit(attack_process, url, start_at, seconds, hostile_clients) if hostile_clients else None
        wait_until(start_at)
        load = asyncio.run(visitors(url, seconds, clients, queries, uploads, like_ids, seed, mix))
        return load, (attacks.result() if attacks else Recorder()), probe.result()


def unique_queries(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = set()
    while len(out) < count:
        words = " ".join(rng.choice(QUERY_WORDS, size=int(rng.integers(1, 4)), replace=False))
        out.add(f"{words} {rng.choice(KINDS)} of {rng.choice(PLACES)} {int(rng.integers(0, 10**6))}")
    return sorted(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="maps in the collection")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the normal mix")
    parser.add_argument("--hostile-clients", type=int, default=4, help="concurrent hostile clients in phase 2")
    parser.add_argument("--seconds", type=float, default=60, help="length of each phase")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of the normal mix before measuring")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (the plugin's default)")
    parser.add_argument("--mix", type=parse_mix, default=MIX, help="request mix, e.g. text=0.5,like=0.5")
    parser.add_argument("--no-hostile", action="store_true", help="only the normal phase (a concurrency run)")
    parser.add_argument("--db", type=Path, help="serve this collection (e.g. the search benchmark's) instead")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "soak.md")
    args = parser.parse_args()
    import httpx
    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    checkpoint = random_checkpoint(args.cache)
    db = args.db or args.cache / f"soak-{args.rows}.db"
    if args.db:
        from datasette_mapclip.store import MapStore

        store = MapStore(args.db)
        args.rows = store.conn.execute("SELECT max(id) FROM maps").fetchone()[0]
        store.close()
    if not db.exists():
        set_torch_threads(2)
        encoder = load_encoder(ModelSpec("ViT-B-32", None, str(checkpoint)), precision="fp32")
        print(f"building {db} ...")
        build_database(db.with_suffix(".tmp.db"), encoder, args.rows, max(100, args.rows // 100))
        shutil.move(db.with_suffix(".tmp.db"), db)
        del encoder

    print("preparing requests ...")
    uploads = [map_jpeg(seed) for seed in range(8)]
    hostile = hostile_requests()  # for the table's row names; the attack process builds its own
    queries = unique_queries(20_000, 7)
    like_ids = list(range(1, args.rows + 1, 7))

    server = Server(db, args.cache, args.threads)
    rows = []
    try:
        with httpx.Client() as client:
            server.wait(client, "/-/mapclip/search.json?q=warm+up&k=10",
                        lambda r: r.status_code == 200 and r.json().get("searched_with", "") in READY)
        print(f"warm-up {args.warmup:.0f} s ...")
        asyncio.run(visitors(server.url, args.warmup, args.clients, queries, uploads, like_ids, 99, args.mix))
        rss_start = memory_of(server.process.pid)
        phases = {}
        plan = [("normal", 0)] + ([] if args.no_hostile else [("hostile", args.hostile_clients)])
        for name, hostile_clients in plan:
            print(f"phase {name}: {args.clients} clients + {hostile_clients} hostile, {args.seconds:.0f} s ...")
            phases[name] = run_phase(server.url, args.seconds, args.clients, hostile_clients, queries, uploads,
                                     like_ids, seed=hostile_clients, mix=args.mix)
        rss_end = memory_of(server.process.pid)
    finally:
        server.stop()

    for name, (load, attacks, probe) in phases.items():
        total = sum(len(v) for v in load.latencies.values())
        row = {"phase": name, "rps": total / load.elapsed, "errors5xx": load.server_errors() + attacks.server_errors()
               + probe.server_errors(), "failed": sum(load.failures.values()) + sum(probe.failures.values())}
        for kind in ("text", "like", "upload"):
            values = load.latencies.get(kind, [])
            row[kind] = (len(values), percentile(values, 50) if values else 0, percentile(values, 95) if values else 0)
        for kind in ("more like this", "/-/versions.json"):
            values = probe.latencies.get(kind, [])
            row["probe " + kind] = percentile(values, 95) if values else float("nan")
        row["attacks"] = {k: dict(sorted(v.items())) for k, v in attacks.statuses.items()}
        row["attack_failures"] = dict(attacks.failures)
        row["non_200"] = {k: {s: n for s, n in v.items() if s != 200} for k, v in load.statuses.items()}
        rows.append(row)

    if args.no_hostile:
        return write_concurrency_report(args, rows[0], phases["normal"][0], rss_start, rss_end, torch)
    normal, hostile_row = rows
    like_ratio = hostile_row["probe more like this"] / normal["probe more like this"]
    versions_ratio = hostile_row["probe /-/versions.json"] / normal["probe /-/versions.json"]
    growth = rss_end["VmRSS"] - rss_start["VmRSS"]
    total_5xx = sum(r["errors5xx"] for r in rows)
    lines = [
        "# Load and soak: many clients against `datasette serve`, with and without hostile requests",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/soak_bench.py'] + sys.argv[1:])}` on {datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores (client and server share them), torch {torch.__version__}, "
        f"{platform.python_implementation()} {platform.python_version()}.",
        "",
        f"{args.rows:,} synthetic maps, ViT-B-32 (random weights) for text and uploads, in-memory index ready, "
        f"torch threads = {args.threads}. {args.clients} clients back to back for {args.seconds:.0f} s per phase "
        f"(text 50% with unique queries / more like this 30% / upload of a 1200x900 JPEG 20%), after "
        f"{args.warmup:.0f} s of warm-up; phase 2 adds {args.hostile_clients} clients sending hostile requests "
        "back to back (from a process of their own, at nice 19: their CPU would be on their own machines). "
        "A probe, in a third process, asks for one \"more like this\" "
        "and `/-/versions.json` every 250 ms.",
        "",
        "| phase | requests/s | text n / p50 / p95 | like n / p50 / p95 | upload n / p50 / p95 | 5xx |"
        " failed (normal mix and probe) |"
        " probe: more like this p95 | probe: /-/versions p95 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[k][0]} / {r[k][1]:.0f} ms / {r[k][2]:.0f} ms" for k in ("text", "like", "upload")]
        lines.append(f"| {r['phase']} | {r['rps']:.1f} | {' | '.join(cells)} | {r['errors5xx']} | {r['failed']} | "
                     f"{r['probe more like this']:.0f} ms | {r['probe /-/versions.json']:.0f} ms |")
    lines += [
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| no 5xx in either phase | {total_5xx} | {'PASS' if total_5xx == 0 else 'FAIL'} |",
        f"| no failed requests in the normal mix or the probe | {sum(r['failed'] for r in rows)} | "
        f"{'PASS' if sum(r['failed'] for r in rows) == 0 else 'FAIL'} |",
        f"| server RSS after warm-up -> at the end (no growth) | {rss_start['VmRSS']:,.0f} MB -> {rss_end['VmRSS']:,.0f} MB"
        f" ({growth:+,.0f} MB; peak VmHWM {rss_end['VmHWM']:,.0f} MB) | {'PASS' if growth <= 0.05 * rss_start['VmRSS'] else 'FAIL'} |",
        f"| \"more like this\" p95 under the hostile stream, vs without | {like_ratio:.2f}x | "
        f"{'PASS' if like_ratio <= 2 else 'FAIL'} (<= 2x) |",
        f"| `/-/versions.json` p95 under the hostile stream, vs without | {versions_ratio:.2f}x | "
        f"{'PASS' if versions_ratio <= 2 else 'FAIL'} (<= 2x) |",
        "",
        "Hostile requests sent in phase 2 and the statuses they got (count per status):",
        "",
        "| request | statuses | dropped connections |",
        "|---|---|---|",
    ]
    for name in [name for name, _, _ in hostile]:
        statuses = hostile_row["attacks"].get(name, {})
        lines.append(f"| {name} | {', '.join(f'{s}: {n}' for s, n in statuses.items()) or '-'} | "
                     f"{hostile_row['attack_failures'].get(name, 0)} |")
    other = {p["phase"]: p["non_200"] for p in rows if any(p["non_200"].values())}
    if other:
        lines += ["", f"Normal-mix answers other than 200: {other}"]
    lines += ["", "RSS growth counts as growth when it is over 5% of the RSS after the warm-up. A dropped connection",
              "for a hostile request is the HTTP server refusing it before Datasette sees it (uvicorn closes",
              "the connection on a request line past its limit); 5xx counts every answer in both phases."]
    from read_routes_soak import SECTION_START  # that script's section of the same file is kept

    if args.output.exists() and SECTION_START in args.output.read_text():
        lines += ["", SECTION_START + args.output.read_text().split(SECTION_START, 1)[1].rstrip("\n")]
    write_report(args.output, lines)


def write_concurrency_report(args, row: dict, load: Recorder, rss_start: dict, rss_end: dict, torch):
    """One phase, no hostile clients: searches per second and latency under concurrent clients."""
    everything = [ms for values in load.latencies.values() for ms in values]
    errors = sum(n for counts in load.statuses.values() for status, n in counts.items() if status != 200)
    errors += sum(load.failures.values())
    p95 = percentile(everything, 95)
    mix = " / ".join(f"{kind} {weight:.0%}" for kind, weight in args.mix)
    lines = [
        "# Concurrency: searches per second from one server",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/soak_bench.py'] + sys.argv[1:])}` on {datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores (client and server share them), torch {torch.__version__}.",
        "",
        f"{args.rows:,} maps, ViT-B-32 (random weights), in-memory index ready, torch threads = {args.threads}; "
        f"{args.clients} clients sending requests back to back for {args.seconds:.0f} s ({mix}; unique text "
        f"queries) after {args.warmup:.0f} s of warm-up.",
        "",
        "| measure | value | goal | |",
        "|---|---|---|---|",
        f"| searches per second | {row['rps']:.1f} | >= 15 | {'PASS' if row['rps'] >= 15 else 'FAIL'} |",
        f"| p95, all searches | {p95:.0f} ms | <= 500 ms | {'PASS' if p95 <= 500 else 'FAIL'} |",
        f"| errors (not 200, or no answer) | {errors} | 0 | {'PASS' if errors == 0 else 'FAIL'} |",
    ]
    for kind in ("text", "like", "upload"):
        n, p50, kind_p95 = row[kind]
        if n:
            lines.append(f"| {kind}: n / p50 / p95 | {n} / {p50:.0f} ms / {kind_p95:.0f} ms | | |")
    lines += [
        f"| probe (its own process, every 250 ms): more like this p95 | {row['probe more like this']:.0f} ms | | |",
        f"| server RSS after warm-up / at the end (VmHWM) | {rss_start['VmRSS']:,.0f} MB / {rss_end['VmRSS']:,.0f} MB "
        f"({rss_end['VmHWM']:,.0f} MB) | | |",
        "",
        "Text encoding runs in one model thread; \"more like this\" never waits for it (its own index thread).",
    ]
    write_report(args.output, lines)


if __name__ == "__main__":
    main()
