"""Searching by the words printed on the maps at Library of Congress scale, through the real JSON API.

    .venv/bin/python bench/words_bench.py            # 562,842 maps x 100 words, >= 50 queries per row

What it does, and why:
1. Copies the search benchmark's collection (bench/.cache/search-562842-catalogue.db: 562,842 maps
   with synthetic vectors and catalogue; built by bench/search_bench.py, never modified here) to
   bench/.cache/words-562842.db and adds 100 synthetic OCR words to every map (56 M ``map_words``
   rows): place-name-like labels drawn from a Zipf-Mandelbrot distribution over a vocabulary of
   ~40 common map words ("river", "road", "county", ...) and ~150,000 made-up names, sometimes two
   words ("Cape Ashbury", "Marlow Creek").  The rows are written by bulk SQL into the schema the
   store created (``MapStore`` + ``WordStore.register_ocr_model``); the FTS index is built by FTS5's
   own ``rebuild`` and the insert trigger restored from the store's schema, so the file is what
   ``WordStore.write_reading`` would have made, and the store's own read functions check it.
   The build is timed and cached (``--rebuild`` to make it again).
2. Starts ``datasette serve -i`` on it (the plugin's metadata as the search benchmark sets it) and
   waits until searches are answered by the in-memory index.
3. Times ``/-/mapclip/search.json`` end to end (k = 10), >= 50 queries per row: a text query with a
   ``words`` filter naming a rare name, a mid-frequency word, a very common word, and
   ``rank=hybrid`` with text holding rare and common place names.  Reports the share of maps each
   word matches (counted while the words were generated) and writes bench/results/words.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from search_bench import KINDS, QUERY_WORDS, Server, percentile, write_report  # noqa: E402

from datasette_mapclip.store import MapStore  # noqa: E402
from datasette_mapclip.store.schema import SCHEMA, sqlite3_module  # noqa: E402
from datasette_mapclip.store.words import (  # noqa: E402
    WORD_ID_BITS,
    WordStore,
    has_words,
    read_map_reading,
    read_map_words,
    read_maps_matching_words,
    read_words_summary,
    word_id,
    word_ids_by_map,
)

WORDS_PER_MAP = 100
# The most common words printed on maps, most common first (they take the top ranks of the Zipf law).
COMMON = ["river", "road", "county", "creek", "lake", "church", "school", "mill", "hill", "station", "bridge",
          "railroad", "north", "south", "township", "island", "point", "bay", "mount", "fort", "harbor", "east",
          "west", "branch", "run", "pond", "city", "cemetery", "post", "office", "ferry", "spring", "valley", "ridge",
          "mountain", "falls", "landing", "cape", "port", "lighthouse"]
PREFIXES = ["Cape", "Mount", "Port", "Fort", "Lake", "Saint", "New", "North", "South", "East", "West"]
SUFFIXES = ["River", "Creek", "Hill", "Lake", "Island", "Point", "Bay", "Mill", "Station", "Springs", "Harbor",
            "Ridge", "Falls", "Landing", "Township", "County"]
ONSETS = ["b", "br", "c", "ch", "cl", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pr", "r", "s", "sh",
          "st", "t", "tr", "v", "w", "wh", "y", "z", "ash", "el", "or", "ab", "in", "ur"]
NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ay", "ow", "ie", "é", "ö"]
CODAS = ["", "n", "r", "l", "m", "s", "t", "ck", "nd", "rt", "ll", "ng", "st", "th", "x"]
ENDINGS = ["ton", "ville", "burg", "field", "ford", "wood", "dale", "mouth", "port", "ham", "by", "wick", "stead",
           "more", "land", "ley", "bury", "worth", "shire", "haven", ""]


def vocabulary(size: int, seed: int = 7) -> list[str]:
    """COMMON, then ``size`` distinct made-up names (two or three syllables and an ending)."""
    rng = np.random.default_rng(seed)
    names, seen = [], set(COMMON) | {w.lower() for w in PREFIXES + SUFFIXES}
    while len(names) < size:
        count = int(rng.integers(1, 3))
        name = "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS) for _ in range(count))
        name = (name + rng.choice(ENDINGS)).capitalize()
        if len(name) >= 4 and name.lower() not in seen:  # (folded forms may still clash: see main)
            seen.add(name.lower())
            names.append(name)
    return COMMON + names


def rank_probabilities(size: int, q: float = 2.7, s: float = 1.0) -> np.ndarray:
    """Zipf-Mandelbrot: p(rank r) ~ 1 / (r + q) ** s."""
    weights = 1.0 / (np.arange(1, size + 1) + q) ** s
    return weights / weights.sum()


def fold(text: str) -> str:
    """Case and diacritics folded as the FTS5 tokenizer folds them (for matching the query words)."""
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFD", text.casefold()) if not unicodedata.combining(c))


def generate_words(rows: int, vocab: list[str], seed: int = 11, chunk: int = 10_000):
    """Chunks of (map ids, label texts) and, at the end, each folded token's number of maps:
    WORDS_PER_MAP labels per map, one token from the Zipf law, in 15% of labels with a generic
    word before or after it ("Cape X", "X Creek"), a third of them in capitals as maps print them."""
    rng = np.random.default_rng(seed)
    probs = np.cumsum(rank_probabilities(len(vocab)))
    folded = [fold(w) for w in vocab]
    extra = {fold(w): None for w in PREFIXES + SUFFIXES}
    extra_ids = {}
    for word in extra:  # generic words are tokens of the vocabulary too ("river" is both)
        extra_ids[word] = next((i for i, f in enumerate(folded) if f == word), None)
    prefix_ids = np.array([extra_ids[fold(w)] if extra_ids[fold(w)] is not None else -1 for w in PREFIXES])
    suffix_ids = np.array([extra_ids[fold(w)] if extra_ids[fold(w)] is not None else -1 for w in SUFFIXES])
    maps_with = np.zeros(len(vocab), np.int64)
    vocab_arr = np.array(vocab, dtype=object)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        n = (stop - start) * WORDS_PER_MAP
        map_ids = np.repeat(np.arange(start + 1, stop + 1), WORDS_PER_MAP)
        tokens = np.minimum(np.searchsorted(probs, rng.random(n)), len(vocab) - 1)
        texts = vocab_arr[tokens]
        kind = rng.random(n)
        pre = kind < 0.07
        post = (kind >= 0.07) & (kind < 0.15)
        upper = rng.random(n) < 0.33
        p_choice = rng.integers(0, len(PREFIXES), n)
        s_choice = rng.integers(0, len(SUFFIXES), n)
        second = np.full(n, -1)
        second[pre] = prefix_ids[p_choice[pre]]
        second[post] = suffix_ids[s_choice[post]]
        labels = []
        for i in range(n):
            text = texts[i]
            if pre[i]:
                text = f"{PREFIXES[p_choice[i]]} {text.capitalize() if text.islower() else text}"
            elif post[i]:
                text = f"{text.capitalize() if text.islower() else text} {SUFFIXES[s_choice[i]]}"
            labels.append(text.upper() if upper[i] else text)
        # which maps hold each token (a map counted once per token)
        both = np.concatenate([map_ids.astype(np.int64) * len(vocab) + tokens,
                               (map_ids.astype(np.int64) * len(vocab) + second)[second >= 0]])
        maps_with += np.bincount(np.unique(both) % len(vocab), minlength=len(vocab))
        yield map_ids, labels
    yield None, maps_with


def word_ids(map_ids: np.ndarray) -> np.ndarray:
    """``store.words.word_id`` of each label: a map's WORDS_PER_MAP labels come one after another."""
    places = np.tile(np.arange(WORDS_PER_MAP, dtype=np.int64), len(map_ids) // WORDS_PER_MAP)
    ids = (map_ids.astype(np.int64) << WORD_ID_BITS) + places
    assert int(ids[0]) == word_id(int(map_ids[0]), 0) and int(ids[-1]) == word_id(int(map_ids[-1]), WORDS_PER_MAP - 1)
    return ids


def build_words_database(source: Path, target: Path, rows: int, vocab_size: int) -> dict:
    """Copy ``source`` to ``target`` and add WORDS_PER_MAP words to each of its first ``rows`` maps;
    returns the build's timings and each vocabulary word's share of maps."""
    timings = {}
    started = time.perf_counter()
    tmp = target.with_suffix(".tmp.db")
    for stale in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        stale.unlink(missing_ok=True)
    shutil.copyfile(source, tmp)
    timings["copy"] = time.perf_counter() - started
    store = MapStore(tmp)  # the store's schema, words tables included
    ocr_model = WordStore(store).register_ocr_model(
        {"engine": "synthetic", "engine_version": "1", "weights": {}, "settings": {"words_per_map": WORDS_PER_MAP}})
    conn = store.conn
    assert conn.execute("SELECT count(*) FROM map_words").fetchone()[0] == 0, "the source already has words"
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=OFF")  # a cache file, built once: no journal
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    # Bulk: the FTS insert trigger is dropped for the insert and the index built by FTS5's own
    # 'rebuild' (the same index the trigger would have made, much faster); the trigger is then
    # restored from the store's own schema text.
    conn.execute("DROP TRIGGER map_words_ai")
    conn.execute("DROP TRIGGER map_words_id_names_map")  # ids checked once at the end instead
    conn.execute("DROP INDEX map_words_map")  # made again after the insert: faster than kept up row by row
    vocab = vocabulary(vocab_size)
    rng = np.random.default_rng(3)
    t = time.perf_counter()
    maps_with = None
    assert word_ids_by_map(conn)
    conn.execute("BEGIN")
    written = 0
    for map_ids, labels in generate_words(rows, vocab):
        if map_ids is None:
            maps_with = labels
            break
        n = len(labels)
        boxes = rng.random((n, 4)) * [0.9, 0.95, 0.2, 0.05]
        conf = 0.5 + 0.5 * rng.random(n)
        angle = np.where(rng.random(n) < 0.1, rng.uniform(-90, 90, n), 0.0)
        conn.executemany(
            "INSERT INTO map_words (id, map_id, text, confidence, x, y, w, h, angle, ocr_model) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            zip(word_ids(map_ids).tolist(), map_ids.tolist(), labels, conf.round(3).tolist(),
                boxes[:, 0].round(4).tolist(), boxes[:, 1].round(4).tolist(), boxes[:, 2].round(4).tolist(),
                boxes[:, 3].round(4).tolist(), angle.round(1).tolist(), [ocr_model.id] * n))
        written += n
        print(f"  words of {map_ids[-1]:,} / {rows:,} maps ({written / (time.perf_counter() - t):,.0f} rows/s)",
              end="\r", flush=True)
    print()
    read_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    conn.execute("INSERT INTO map_words_read (map_id, ocr_model, read_at, word_count, width, height, seconds) "
                 "SELECT id, ?, ?, ?, 1600, 1200, NULL FROM maps WHERE id <= ? ORDER BY id",
                 (ocr_model.id, read_at, WORDS_PER_MAP, rows))
    conn.execute("COMMIT")
    timings["insert"] = time.perf_counter() - t
    t = time.perf_counter()
    conn.executescript(SCHEMA)  # restores the map_id index (the trigger stays off until the FTS is built)
    conn.execute("DROP TRIGGER IF EXISTS map_words_ai")
    timings["map_id index"] = time.perf_counter() - t
    t = time.perf_counter()
    conn.execute("INSERT INTO map_words_fts(map_words_fts) VALUES ('rebuild')")
    timings["fts rebuild"] = time.perf_counter() - t
    conn.executescript(SCHEMA)  # the insert trigger, exactly as the store's schema writes it
    conn.execute("PRAGMA journal_mode=DELETE")
    store.close()
    shares = {fold(w): int(c) / rows for w, c in zip(vocab, maps_with)}
    check_words_database(tmp, rows, shares)
    shutil.move(tmp, target)
    timings["total"] = time.perf_counter() - started
    return {"timings": timings, "shares": shares, "vocab_size": vocab_size, "rows": rows}


def check_words_database(path: Path, rows: int, shares: dict):
    """The file as the store reads it: the words tables exactly as a new file's schema has them,
    the summary, a map's words and mark, and a words search answered through the FTS index."""
    fresh = MapStore(":memory:")
    words_schema = "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name LIKE 'map_words%' ORDER BY name"
    want = [tuple(r) for r in fresh.conn.execute(words_schema)]
    fresh.close()
    store = MapStore(path)
    try:
        conn = store.conn
        assert has_words(conn)
        assert [tuple(r) for r in conn.execute(words_schema)] == want
        assert conn.execute(f"SELECT count(*) FROM map_words WHERE id >> {WORD_ID_BITS} != map_id").fetchone()[0] == 0
        summary = read_words_summary(conn)
        assert summary == {"maps_read": rows, "no_text": 0, "words": rows * WORDS_PER_MAP}, summary
        words = read_map_words(conn, rows // 2)
        assert len(words) == WORDS_PER_MAP, len(words)
        assert read_map_reading(conn, rows // 2)["word_count"] == WORDS_PER_MAP
        rarest = min(words, key=lambda w: max(shares.get(fold(t), 1.0) for t in w["text"].split()))["text"]
        found = read_maps_matching_words(conn, rarest, limit=5)
        assert rows // 2 in {f["map_id"] for f in found} or len(found) == 5, (rarest, found)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        store.close()


def pick_words(shares: dict, low: float, high: float, count: int, rng, exclude=()) -> list[str]:
    """``count`` folded single words whose share of maps lies in [low, high] (repeats if too few)."""
    fitting = sorted(w for w, s in shares.items() if low <= s <= high and " " not in w and w not in exclude)
    if not fitting:
        raise SystemExit(f"no word with a share of maps in [{low}, {high}]")
    return [str(w) for w in rng.choice(fitting, size=count, replace=len(fitting) < count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=562_842, help="maps given words (the paper: 562,842)")
    parser.add_argument("--vocabulary", type=int, default=150_000, help="made-up place names beside the common words")
    parser.add_argument("--queries", type=int, default=60, help="queries timed per row (>= 50)")
    parser.add_argument("--threads", type=int, default=2, help="threads per encode in the server")
    parser.add_argument("--row-seconds", type=float, default=180,
                        help="stop timing a row after this long (at least 5 queries): a row that slow fails anyway")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--source", type=Path, default=None,
                        help="the search benchmark's collection (default: CACHE/search-562842-catalogue.db)")
    parser.add_argument("--rebuild", action="store_true", help="build the words file again")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "words.md")
    args = parser.parse_args()
    import httpx

    source = args.source or args.cache / "search-562842-catalogue.db"
    db = args.cache / f"words-{args.rows}.db"
    built_file = args.cache / f"words-{args.rows}.build.json"
    if args.rebuild or not db.exists() or not built_file.exists():
        if not source.exists():
            raise SystemExit(f"{source} is missing: run bench/search_bench.py first")
        print(f"building {db} from {source} ...")
        build = build_words_database(source, db, args.rows, args.vocabulary)
        build["size"] = db.stat().st_size
        build["date"] = str(datetime.date.today())
        built_file.write_text(json.dumps(build))
        print(f"  built in {build['timings']['total']:.0f} s: {build['timings']}")
    build = json.loads(built_file.read_text())
    if args.build_only:
        return
    # Names whose folded forms fall together ("Wést" and "west") are one word to FTS5: their shares
    # were counted apart, so they are never picked.
    folded = collections.Counter(fold(w) for w in vocabulary(build["vocab_size"]))
    clashing = {w for w, count in folded.items() if count > 1}
    shares = {w: s for w, s in build["shares"].items() if w not in clashing}
    rng = np.random.default_rng(5)
    n = args.queries
    rare = pick_words(shares, 0.00005, 0.0005, n, rng)
    mid = pick_words(shares, 0.01, 0.05, n, rng)
    common = pick_words(shares, 0.5, 1.0, n, rng)
    phrases = [f"{rng.choice(QUERY_WORDS)} {rng.choice(KINDS)}" for _ in range(n)]
    # Two-word names: a rare name with a generic word beside it, as maps print them ("Cape X"), all
    # words on the map (or run together).
    two = [f"{rng.choice(PREFIXES)} {w}" for w in rare[: n // 2]] + [f"{w} {rng.choice(SUFFIXES)}" for w in rare[n // 2:]]

    def share_of(words: str) -> float:  # every word must be on the map: at most the rarest one's share
        return min([shares[fold(w)] for w in words.split() if fold(w) in shares] or [0.0])

    rows = [
        ("(a) q + words = a rare name", [{"q": p, "words": w} for p, w in zip(phrases, rare)], rare),
        ("(a2) q + words = a rare two-word name (\"Cape X\", \"X Creek\")",
         [{"q": p, "words": w} for p, w in zip(phrases, two)], two),
        ("(b) q + words = a mid-frequency word", [{"q": p, "words": w} for p, w in zip(phrases, mid)], mid),
        ("(c) q + words = a very common word", [{"q": p, "words": w} for p, w in zip(phrases, common)], common),
        ("(d1) rank=hybrid, q = a kind of map + a rare name",
         [{"q": f"{k} of {w.capitalize()}", "rank": "hybrid"} for k, w in zip(KINDS * n, rare)], rare),
        ("(d2) rank=hybrid, q = text with common words and a rare name",
         [{"q": f"{c} {k} near {w.capitalize()}", "rank": "hybrid"} for c, k, w in zip(common, KINDS * n, rare)],
         [f"{c} {w}" for c, w in zip(common, rare)]),
        ("(d3) rank=hybrid, q = common words only",
         [{"q": f"{c} {k}", "rank": "hybrid"} for c, k in zip(common, KINDS * n)], common),
    ]
    from datasette_mapclip.settings import DECLARED

    ready_with = "in-memory {}".format("fast-scan" if args.rows >= DECLARED["fast_scan_min_rows"].default else "int8")
    results = {}
    with httpx.Client() as client:
        server = Server(db, args.cache, args.threads)
        try:
            up, _ = server.wait(client, "/-/versions.json")
            # Ready: searches answered by the in-memory index in its final form (as search_bench.py
            # waits: fast-scan codes from fast_scan_min_rows maps, built after the int8 codes serve,
            # so timing before them would time the build too).
            ready, _ = server.wait(client, "/-/mapclip/search.json?q=warm+up+query&k=10",
                                   lambda r: r.status_code == 200
                                   and r.json().get("searched_with", "").startswith(ready_with), timeout=1800)
            # warm-up: the words index pages into the page cache once
            for params in (rows[0][1][0], rows[3][1][0], rows[5][1][0]):
                client.get(server.url + "/-/mapclip/search.json?" + urllib.parse.urlencode({**params, "k": 10}),
                           timeout=300)
            for name, queries, words in rows:
                times, ways, counts, statuses = [], set(), [], set()
                row_started = time.perf_counter()
                for params in queries:
                    if time.perf_counter() - row_started > args.row_seconds and len(times) >= 5:
                        break  # too slow to time every query: the row says how many ran
                    t = time.perf_counter()
                    response = client.get(server.url + "/-/mapclip/search.json?" + urllib.parse.urlencode(
                        {**params, "k": 10}), timeout=300)
                    times.append((time.perf_counter() - t) * 1000)
                    statuses.add(response.status_code)
                    data = response.json()
                    ways.add(data.get("searched_with", f"HTTP {response.status_code}: {data.get('error')}"))
                    counts.append(len(data.get("results", [])))
                share_list = [share_of(w) if "hybrid" not in name else max(shares.get(fold(x), 0.0) for x in w.split())
                              for w in words[:len(times)]]
                results[name] = {"p50": percentile(times, 50), "p95": percentile(times, 95), "n": len(times),
                                 "ways": ways, "statuses": statuses, "results": statistics.mean(counts),
                                 "share": (min(share_list), statistics.median(share_list), max(share_list))}
                print(name, f"p50 {results[name]['p50']:.1f} ms p95 {results[name]['p95']:.1f} ms", ways)
            memory = dict(server.peak)
        finally:
            server.stop()

    (args.cache / "words-results.json").write_text(json.dumps(  # the raw numbers, beside the cached file
        {name: {**row, "ways": sorted(row["ways"]), "statuses": sorted(row["statuses"])} for name, row in results.items()},
        indent=1))
    timings = build["timings"]
    lines = [
        "# Words benchmark: `words` filter and `rank=hybrid` at Library of Congress scale",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/words_bench.py'] + sys.argv[1:])}` on {datetime.date.today()},"
        f" {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()},"
        f" SQLite {sqlite3_module().sqlite_version}.",
        "",
        f"{build['rows']:,} maps (the search benchmark's synthetic vectors and catalogue) with {WORDS_PER_MAP} synthetic"
        f" OCR words each: {build['rows'] * WORDS_PER_MAP:,} `map_words` rows. Labels follow a Zipf-Mandelbrot law"
        f" (p ~ 1/(rank + 2.7)) over {len(COMMON)} common map words (\"river\", \"road\", \"county\", ...) and"
        f" {build['vocab_size']:,} made-up place names; 15% of labels are two words (\"Cape X\", \"X Creek\"), a third"
        " in capitals.",
        f"Built on {build['date']} in {timings['total']:.0f} s (copy {timings['copy']:.0f} s, insert"
        f" {timings['insert']:.0f} s, map_id index {timings['map_id index']:.0f} s, FTS5 rebuild {timings['fts rebuild']:.0f} s);"
        f" no ANALYZE (the loaders run none); the file is {build['size'] / 1e9:.2f} GB on disk.",
        "",
        f"Each query timed end to end through `/-/mapclip/search.json` (k = 10) on `datasette serve -i` (warm server,"
        f" in-memory index ready after {ready:.0f} s; text encoded by the file's stored ONNX encoder), {n} queries per"
        " row, each with its own word. Share of maps: the share of the maps printing the word (min / median / max over"
        " the row's words; for two words, the rarer one's share bounds the maps holding both; for hybrid, the most"
        " common word of the text).",
        "",
        "| query | share of maps (min / median / max) | queries | p50 | p95 | goal: p50 <= 100 ms | answered by |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        low, mid_share, high = row["share"]
        ways = "; ".join(sorted(w.replace("in-memory fast-scan + exact re-scoring", "fast-scan") for w in row["ways"]))
        bad = "" if row["statuses"] == {200} else f" (HTTP {sorted(row['statuses'])})"
        lines.append(f"| {name} | {low:.3%} / {mid_share:.3%} / {high:.3%} | {row['n']} | {row['p50']:.1f} ms |"
                     f" {row['p95']:.1f} ms |"
                     f" {'PASS' if row['p50'] <= 100 and not bad else 'FAIL'}{bad} | {ways} |")
    lines += ["", f"Server peak anonymous memory {memory.get('RssAnon', 0):,.0f} MB, page cache of mapped files"
              f" {memory.get('RssFile', 0):,.0f} MB."]
    write_report(args.output, lines)


if __name__ == "__main__":
    main()
