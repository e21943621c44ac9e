"""The Ray engine (``--engine ray``) on a local 2-CPU Ray: the same rows and vectors as the local
pipeline, a model actor or the driver killed mid-load, the cluster-wide rate limit, and the
advice when Ray is missing.  No network: local files and the loc.gov stand-in only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL, make_folder, open_db
from datasette_mapclip.store import MapStore
from loc_server import map_image

ROW_COLUMNS = ("source_id, source, item_id, sheet, title, date, year, place, subjects, contributors, notes, "
               "format, item_url, image_url, location, thumbnail_url, thumbnail, width, height")


def vectors_by_source(db_path) -> dict:
    store = MapStore(db_path)
    ids, matrix = store.vectors()
    source_ids = dict(store.conn.execute("SELECT id, source_id FROM maps").fetchall())
    store.close()
    return {source_ids[i]: vector for i, vector in zip(ids, matrix)}


def table(db_path, sql) -> list[tuple]:
    return sorted(tuple(row) for row in open_db(db_path).execute(sql))


def assert_same_collection(local_db, ray_db):
    """Same maps rows, items, load errors, model precision; vectors within cosine 0.9999."""
    for sql in (f"SELECT {ROW_COLUMNS} FROM maps", "SELECT * FROM items",
                "SELECT source_id, source, location, stage, reason FROM load_errors",
                "SELECT name, architecture, checkpoint_sha256, dim, precision FROM models"):
        assert table(ray_db, sql) == table(local_db, sql), sql
    local, remote = vectors_by_source(local_db), vectors_by_source(ray_db)
    assert local.keys() == remote.keys() and local
    cosines = [float(local[key] @ remote[key]) for key in local]
    assert min(cosines) >= 0.9999, min(cosines)
    return local, remote


def test_a_folder_load_through_ray_equals_the_local_pipeline(ray_cluster, tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 36, formats=("JPEG", "PNG", "TIFF"))
    (folder / "broken.jpg").write_bytes((folder / "sheet_0003.jpg").read_bytes()[:600])
    (folder / "page.png").write_bytes(b"<!DOCTYPE html><html>Forbidden</html>")
    common = ["--precision", "fp32", "--batch-size", "8"]
    invoke(["load", "folder", tmp_path / "local.db", folder, *model_args, *common])
    out = invoke(["load", "folder", tmp_path / "ray.db", folder, *model_args, *common, "--engine", "ray"])
    assert "36 loaded, 0 skipped (already stored), 2 failed" in out.output
    assert "in 1 Ray actor(s)" in out.output and "(fp32 on cpu)" in out.output
    local, remote = assert_same_collection(tmp_path / "local.db", tmp_path / "ray.db")
    # the same numeric path: not merely close, the same numbers up to float rounding
    assert max(float(np.abs(local[k] - remote[k]).max()) for k in local) < 1e-5
    db = open_db(tmp_path / "ray.db")
    assert db.execute("SELECT count(*) FROM maps WHERE thumbnail IS NOT NULL").fetchone()[0] == 36
    load = db.execute("SELECT command, status, loaded, failed FROM loads").fetchone()
    assert tuple(load) == (f"load folder {folder} (ray)", "finished", 36, 2)
    # a rerun through Ray embeds nothing twice
    out = invoke(["load", "folder", tmp_path / "ray.db", folder, *model_args, *common, "--engine", "ray"])
    assert "0 loaded, 36 skipped (already stored), 2 failed" in out.output


def test_a_loc_load_through_ray_equals_the_local_pipeline(ray_cluster, tmp_path, invoke, model_args, loc_server):
    """The stand-in: paged search, a multi-sheet item through its manifest, a 404 and an HTML page;
    precision auto (int8 checked against fp32 on a CPU) in both engines, and the image rate
    limit enforced by the cluster's limiter actor."""
    server = loc_server(items=7, per_page=3, sheets={2: 3}, bad={4: "missing", 6: "html"})
    url = f"{server.url}/collections/test-maps/"
    invoke(["load", "loc", tmp_path / "local.db", url, "--rate", "6000", *model_args])
    image_requests = sum(p.startswith("/iiif/") for p in server.requests)
    out = invoke(["load", "loc", tmp_path / "ray.db", url, "--rate", "6000", *model_args, "--engine", "ray",
                  "--batch-size", "4", "--keep-images", tmp_path / "kept"])
    assert "7 loaded, 0 skipped (already stored), 2 failed" in out.output
    assert "0 read from kept images, 7 newly kept" in out.output
    # the workers sent each download back; this machine kept it as sent
    kept = open_db(tmp_path / "ray.db").execute("SELECT source_id, root, path FROM kept_images").fetchall()
    assert len(kept) == 7
    assert all((Path(root) / path).read_bytes() == map_image(source_id.rsplit("/full/", 1)[0])
               for source_id, root, path in kept)
    assert sum(p.startswith("/iiif/") for p in server.requests) == 2 * image_requests  # each image fetched once
    assert_same_collection(tmp_path / "local.db", tmp_path / "ray.db")
    assert table(tmp_path / "ray.db", "SELECT precision FROM models") == [("int8",)]
    limits = ray_cluster.get_actor("mapclip-host-limits", namespace="mapclip")
    assert ray_cluster.get(limits.reserve.remote("127.0.0.1:1", ((1, 60.0),))) == 0.0  # alive, answering


def test_the_same_file_twice_in_one_ray_run_is_one_map_and_one_request(ray_cluster, tmp_path, invoke, model_args,
                                                                      loc_server):
    """Issue 18 (12b): as the local engine does, a file listed twice (and once more at another
    size: the same canonical image) is embedded once, from one request."""
    import csv

    server = loc_server()
    image = f"{server.service(1)}/full/pct:100/0/default.jpg"
    path = tmp_path / "list.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_url", "resource_url", "segment_num", "p1_item_id", "file_count"])
        for url in (image, image, image.replace("pct:100", "pct:25")):
            writer.writerow([url, "r1", "0", "https://www.loc.gov/item/testmap0001/", "1"])
    out = invoke(["load", "csv", tmp_path / "ray.db", path, "--rate", "0", *model_args, "--engine", "ray"])
    assert "1 loaded, 2 skipped" in out.output, out.output
    assert open_db(tmp_path / "ray.db").execute("SELECT count(*) FROM maps").fetchone()[0] == 1
    assert sum(p.startswith("/iiif/") for p in server.requests) == 1, server.requests  # one request


def test_the_rate_limit_toward_a_host_holds_across_every_worker(ray_cluster, loc_server):
    """Two fetch tasks in two worker processes fetch from one host under a 1-per-0.25 s limit:
    the server sees the requests spaced as one client's would be, not two clients'."""
    from datasette_mapclip.store.records import MapRecord
    from loaders.ray_engine import FetchSettings, Preprocessor, host_limits_actor, prepare_chunk

    server = loc_server(items=8)
    transform = lambda image: np.zeros((3, 8, 8), np.float32)  # noqa: E731 - only fetching matters here
    preprocessor = Preprocessor(8, transform)
    limiter = host_limits_actor(ray_cluster)
    settings = FetchSettings(rules=((1, 0.25),), timeout=10)

    urls = [f"{server.service(n)}/full/!512,512/0/default.jpg" for n in range(1, 9)]

    @ray_cluster.remote(num_cpus=1)
    def fetch(locations):
        items = [(MapRecord(source_id=url, location=url, source="loc"), None) for url in locations]
        prepared, _ = prepare_chunk(items, preprocessor, settings, limiter, store_thumbnail=False,
                                    max_pixels=10**8, keep_size=None, threads=2)
        return os.getpid(), [p.error for p in prepared]

    results = ray_cluster.get([fetch.remote(urls[:4]), fetch.remote(urls[4:])])
    assert len({pid for pid, _ in results}) == 2  # two processes, each with its own Fetcher
    assert all(error is None for _, errors in results for error in errors)
    times = sorted(t for t, path in server.log if path.startswith("/iiif/"))
    assert len(times) == 8
    gaps = np.diff(times)
    # One limiter for the cluster: 8 requests take 7 slots of 0.25 s (two limiters, one per worker,
    # would send them in pairs, ~0.75 s in all).  Each request reaches the server a little after its
    # slot (a loaded 2-core machine delays some by tens of ms), so single gaps get a looser bound.
    assert times[-1] - times[0] >= 7 * 0.25 - 0.05, gaps
    assert gaps.min() >= 0.1, gaps


def test_a_model_actor_killed_mid_load_is_restarted_and_every_image_lands_once(ray_cluster, tmp_path,
                                                                                tiny_checkpoint):
    from datasette_mapclip.model.clip import ModelSpec
    from loaders.ray_engine import NAMESPACE, RayOptions, run_ray_load
    from loaders.sources.folder import folder_records

    folder = make_folder(tmp_path / "scans", 120, metadata=False)
    records = list(folder_records(folder))
    db_path = tmp_path / "m.db"
    store = MapStore(db_path)
    killed = {}

    def slowly():  # a source that trickles, as a paged search does, so the kill lands mid-load
        for record in records:
            time.sleep(0.02)
            yield record

    def kill_the_actor():
        deadline = time.time() + 60
        while time.time() < deadline:
            if MapStore(db_path).counts()["maps"] > 0:
                actor = ray_cluster.get_actor(f"mapclip-model-{os.getpid()}-0", namespace=NAMESPACE)
                killed["at"] = MapStore(db_path).counts()["maps"]
                ray_cluster.kill(actor, no_restart=False)  # as a crash or a lost node would
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor)
    killer.start()
    summary = run_ray_load(store, ModelSpec(TINY_MODEL, None, tiny_checkpoint), slowly(), options=RayOptions(),
                           precision="fp32", batch_size=8, workers=2, progress=False)
    killer.join()
    assert 0 < killed["at"] < 120, killed
    assert (summary.status, summary.loaded, summary.failed) == ("finished", 120, 0), summary.line()
    db = open_db(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*), count(DISTINCT source_id) FROM maps").fetchone()[:] == (120, 120)
    assert db.execute(f"SELECT count(*) FROM {store.model()['vector_table']}").fetchone()[0] == 120
    assert db.execute("SELECT count(*) FROM load_errors").fetchone()[0] == 0


def _count(db_path) -> int:
    try:
        return open_db(db_path).execute("SELECT count(*) FROM maps").fetchone()[0]
    except Exception:
        return 0


def test_a_driver_killed_mid_load_resumes_with_every_image_exactly_once(ray_cluster, tmp_path, model_args):
    """SIGKILL the driver (a separate process that joined this cluster), then rerun it to the end."""
    folder = make_folder(tmp_path / "scans", 240, formats=("JPEG", "PNG"), metadata=False)
    db_path = tmp_path / "m.db"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "datasette_mapclip.cli", "load", "folder", str(db_path), str(folder),
               *model_args, "--engine", "ray", "--ray-address", address, "--batch-size", "8", "--workers", "1"]
    kills = 0
    for _ in range(3):
        before = _count(db_path)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _count(db_path) <= before and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if kills:
            break
    assert kills == 1, "the load finished before it could be killed"
    stored = _count(db_path)
    assert 0 < stored < 240
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    # the rerun embeds only what the killed run had not committed
    assert f"{240 - stored} loaded, {stored} skipped (already stored), 0 failed" in final.stderr, final.stderr
    db = open_db(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    table_name = MapStore(db_path).model()["vector_table"]
    assert db.execute("SELECT count(*), count(DISTINCT source_id) FROM maps").fetchone()[:] == (240, 240)
    assert db.execute(f"SELECT count(*) FROM {table_name}").fetchone()[0] == 240
    assert db.execute(f"SELECT count(*) FROM maps WHERE id NOT IN (SELECT map_id FROM {table_name})").fetchone()[0] == 0
    statuses = [row[0] for row in db.execute("SELECT status FROM loads ORDER BY id")]
    assert statuses == ["killed", "finished"]


@pytest.mark.parametrize("args", [
    ["load", "folder", "{db}", "{folder}"],
    ["fine-tune", "register", "{db}", "--checkpoint", "{checkpoint}", "--model", TINY_MODEL],
])
def test_without_ray_the_command_says_how_to_get_it(tmp_path, invoke, tiny_checkpoint, monkeypatch, args):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    db_path = tmp_path / "m.db"
    if args[0] == "fine-tune":
        MapStore(db_path).close()
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    values = {"db": db_path, "folder": folder, "checkpoint": tiny_checkpoint}
    out = invoke([a.format(**values) for a in args] + ["--engine", "ray"], expect=1)
    assert "pip install 'datasette-mapclip[ray]'" in out.output and "Traceback" not in out.output
    if args[0] == "load":
        assert not db_path.exists()  # nothing was started


def test_every_load_option_has_help():
    import click

    from loaders.cli import load

    for name, command in load.commands.items():
        names = {opt for param in command.params for opt in param.opts}
        assert {"--engine", "--ray-address", "--actors", "--batch-size", "--workers"} <= names, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"load {name} {param.opts[0]} has no help"


def test_reserved_slots_follow_every_rule_in_order():
    """The cluster limiter's booking (RateLimiter.reserve): slots as ``wait`` would grant them,
    handed out without sleeping, evenly spaced at the slowest rule with our margin (3 per 10 s:
    one every 11 / 3 s), never before a slot already booked, after any pause."""
    from loaders.fetch import RateLimiter

    clock = {"now": 100.0}
    limiter = RateLimiter([(2, 1.0), (3, 10.0)], clock=lambda: clock["now"])
    assert [limiter.reserve() for _ in range(6)] == pytest.approx([i * 11 / 3 for i in range(6)])
    clock["now"] = 200.0
    limiter.pause(5.0)
    assert limiter.reserve() == 5.0
