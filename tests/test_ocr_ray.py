"""`mapclip ocr --engine ray` on a local 2-CPU Ray: the real RapidOCR models in OCR actors read the
same words as the local engine on sheets drawn here, a damaged image is a load_errors row while the
rest is read, a rerun reads nothing twice, IIIF images are kept through the driver under the
cluster's rate limiter, and without Ray the command says how to get it in one line.  No network:
local files and the loc.gov stand-in only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_ocr import SHEET, TILES, paper, put

from conftest import make_folder, open_db

pytest.importorskip("rapidocr")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
THREADS = ["--threads", "1"]  # the same threads both ways: the test compares numbers


def table(db_path, sql) -> list[tuple]:
    return sorted(tuple(row) for row in open_db(db_path).execute(sql))


WORDS = ("SELECT maps.source_id, text, confidence, x, y, w, h, angle FROM map_words "
         "JOIN maps ON maps.id = map_words.map_id")
MARKS = ("SELECT maps.source_id, word_count, r.width, r.height, ocr_models.name FROM map_words_read r "
         "JOIN maps ON maps.id = r.map_id JOIN ocr_models ON ocr_models.id = r.ocr_model")
ERRORS = "SELECT source_id, source, location, stage, reason, attempts FROM load_errors"
MODELS = "SELECT name, engine, engine_version, weights, settings FROM ocr_models"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, model_args):
    """Four maps loaded with the tiny model: two lettered sheets (one read in tiles, a word across
    tile edges, a vertical one), a blank sheet, and one whose file is truncated after loading."""
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    folder = tmp_path_factory.mktemp("ocr-ray") / "maps"
    folder.mkdir()
    sheet = paper(SHEET)
    put(sheet, "Hagerstown", (40, 60))
    put(sheet, "Annapolis", (870, 190), angle=90)
    put(sheet, "Cumberland", (372, 470))
    sheet.save(folder / "words.png")
    second = paper((640, 480))
    put(second, "Frederick", (60, 80), size=34)
    put(second, "Chesapeake", (300, 330), size=34)
    second.save(folder / "lettered.png")
    paper((480, 360)).save(folder / "blank.png")
    paper((320, 240)).save(folder / "damaged.png")
    db_path = folder.parent / "maps.db"
    result = CliRunner().invoke(cli, ["load", "folder", str(db_path), str(folder), *model_args])
    assert result.exit_code == 0, result.output
    good = (folder / "damaged.png").read_bytes()
    (folder / "damaged.png").write_bytes(good[: len(good) // 3])  # a truncated PNG: OCR cannot decode it
    return db_path


def copy_of(db_path: Path, name: str) -> Path:
    """A copy beside the original: the maps' locations are relative to the collection's folder."""
    target = db_path.parent / name
    shutil.copy(db_path, target)
    return target


@pytest.fixture(scope="module")
def both_runs(loaded, ray_cluster):
    """The collection read once by each engine; on Ray by two actors, one map per call, so the maps
    are spread over both actors and come back out of order."""
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    local_db, ray_db = copy_of(loaded, "local.db"), copy_of(loaded, "ray.db")
    runner = CliRunner()
    local = runner.invoke(cli, ["ocr", str(local_db), *TILES, *THREADS, "--quiet"], catch_exceptions=False)
    assert local.exit_code == 0, local.output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("loaders.ocr_ray.CHUNK", 1)
        ray = runner.invoke(cli, ["ocr", str(ray_db), *TILES, *THREADS, "--quiet", "--engine", "ray", "--actors", "2",
                                  "--workers", "1"], catch_exceptions=False)
    assert ray.exit_code == 0, ray.output
    return local_db, ray_db, local.output, ray.output


def test_ray_reads_the_same_words_as_the_local_engine(both_runs):
    local_db, ray_db, local_output, ray_output = both_runs
    assert "OCR in 2 Ray actor(s) (1 threads each) on a cluster of 1 node(s), 2 CPUs" in ray_output
    assert "Traceback" not in ray_output
    # the same OCR model (engine, version, model files, settings): a rerun on either engine skips these maps
    assert table(ray_db, MODELS) == table(local_db, MODELS)
    assert table(ray_db, WORDS) == table(local_db, WORDS)
    assert table(ray_db, MARKS) == table(local_db, MARKS)
    texts = sorted(row[1] for row in table(ray_db, WORDS))
    assert texts == ["Annapolis", "Chesapeake", "Cumberland", "Frederick", "Hagerstown"], texts
    for output in (local_output, ray_output):
        assert "read 3 maps" in output and ": 5 words, 1 with no text, 1 failed, 0 already read" in output


def test_a_failing_image_is_a_load_error_and_the_rest_is_read(both_runs):
    local_db, ray_db, _, _ = both_runs
    errors = table(ray_db, ERRORS)
    assert [(row[0], row[3]) for row in errors] == [("damaged.png [ocr]", "ocr")], errors
    assert "decode" in errors[0][4]
    assert errors == table(local_db, ERRORS)  # the same row, reason and location as the local engine's
    read = [row[0] for row in table(ray_db, MARKS)]
    assert read == ["blank.png", "lettered.png", "words.png"]
    loads = open_db(ray_db).execute("SELECT command, status, loaded, skipped, failed FROM loads "
                                    "WHERE command LIKE 'ocr %'").fetchall()
    assert [tuple(row) for row in loads] == [(f"ocr {ray_db} (ray)", "finished", 3, 0, 1)]


def test_a_rerun_on_ray_reads_nothing_already_read(both_runs, tmp_path, invoke):
    _, ray_db, _, _ = both_runs
    db_path = copy_of(ray_db, f"rerun-{tmp_path.name}.db")
    words = table(db_path, "SELECT * FROM map_words")
    marks = table(db_path, "SELECT * FROM map_words_read")
    out = invoke(["ocr", db_path, *TILES, *THREADS, "--quiet", "--engine", "ray"])
    assert "1 maps to read, 3 already read" in out.output  # only the failure is tried again
    assert "read 0 maps" in out.output and "1 failed, 3 already read" in out.output
    assert table(db_path, "SELECT * FROM map_words") == words  # same rows, same ids: nothing rewritten
    assert table(db_path, "SELECT * FROM map_words_read") == marks
    assert table(db_path, "SELECT attempts FROM load_errors") == [(2,)]
    # and the local engine agrees that Ray's reading is its own (the same OCR model)
    out = invoke(["ocr", db_path, *TILES, *THREADS, "--quiet"])
    assert "1 maps to read, 3 already read" in out.output


def test_iiif_images_are_kept_by_the_driver_and_fetched_under_the_cluster_limiter(ray_cluster, loc_server, tmp_path,
                                                                                 invoke, model_args):
    server = loc_server(items=2, per_page=4)
    db_path, keep = tmp_path / "loc.db", tmp_path / "kept"
    invoke(["load", "loc", db_path, f"{server.url}/collections/test-maps/", "--rate", "0", *model_args])
    before = len(server.requests)
    out = invoke(["ocr", db_path, "--ocr-size", "1024", "--rate", "6000", "--keep-images", keep, "--quiet",
                  *THREADS, "--engine", "ray"])
    asked = [path for path in server.requests[before:] if path.startswith("/iiif/")]
    assert len(asked) == 2 and all(path.endswith("/full/!1024,1024/0/default.jpg") for path in asked), asked
    assert "read 2 maps" in out.output and "0 read from kept images, 2 newly kept" in out.output
    assert len(list((keep / "ocr-1024").rglob("*.jpg"))) == 2  # sent back by the actor, written here
    limits = ray_cluster.get_actor("mapclip-host-limits", namespace="mapclip")
    host = server.url.split("://", 1)[1]
    # the actors booked their requests with the cluster's limiter: its next slot toward the host is taken
    assert host in ray_cluster.get(limits.__ray_call__.remote(lambda self: sorted(self.limiters)))
    # other settings read the maps again, from the kept files, without the network
    before = len(server.requests)
    out = invoke(["ocr", db_path, "--ocr-size", "1024", "--overlap", "64", "--rate", "6000", "--keep-images", keep,
                  "--quiet", *THREADS, "--engine", "ray"])
    assert "read 2 maps" in out.output and "2 read from kept images" in out.output
    assert [p for p in server.requests[before:] if p.startswith("/iiif/")] == []


def test_without_ray_the_command_says_how_to_get_it_in_one_line(loaded, tmp_path):
    """As where Ray is not installed: `import ray` fails in a fresh process running the command."""
    db_path = copy_of(loaded, f"no-ray-{tmp_path.name}.db")
    before = table(db_path, "SELECT * FROM loads")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # `import ray` now raises ImportError
        from datasette_mapclip.cli import cli
        cli(["ocr", {str(db_path)!r}, "--engine", "ray"])
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'datasette-mapclip[ray]'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert table(db_path, "SELECT * FROM loads") == before  # nothing was started


def test_a_ray_load_with_ocr_reads_the_words_on_the_same_cluster(ray_cluster, tmp_path, invoke, model_args):
    """`load folder --engine ray --ocr`: the maps are embedded by the model actors, then read by
    the OCR actors (`mapclip ocr --engine ray`'s pass), both runs recorded as Ray runs."""
    folder = tmp_path / "maps"
    folder.mkdir()
    sheet = paper(SHEET)
    put(sheet, "Frederick", (60, 80), size=34)
    put(sheet, "Chesapeake", (420, 380), size=34)
    sheet.save(folder / "lettered.png")
    paper((480, 360)).save(folder / "blank.png")
    db_path = tmp_path / "maps.db"
    out = invoke(["load", "folder", db_path, folder, *model_args, "--engine", "ray", "--ocr", *THREADS, "--no-encoders"])
    assert "OCR in 1 Ray actor(s)" in out.output and "2 maps to read, 0 already read" in out.output
    assert sorted(row[1] for row in table(db_path, WORDS)) == ["Chesapeake", "Frederick"]
    commands = [row[0] for row in open_db(db_path).execute("SELECT command FROM loads ORDER BY id")]
    assert commands == [f"load folder {folder} (ray)", f"ocr {db_path} (ray)"], commands


def test_an_ocr_actor_killed_mid_run_is_restarted_and_every_map_is_read_once(ray_cluster, tmp_path, invoke,
                                                                             model_args, monkeypatch):
    from loaders.fetch import Fetcher
    from loaders.ocr import OcrSettings
    from loaders.ocr_cli import ray_options, run_ocr
    from loaders.ray_engine import NAMESPACE

    folder = make_folder(tmp_path / "scans", 40, metadata=False)
    db_path = tmp_path / "maps.db"
    invoke(["load", "folder", db_path, folder, *model_args, "--no-encoders"])
    monkeypatch.setattr("loaders.ocr_ray.CHUNK", 1)
    killed = {}

    def read_count() -> int:
        try:
            return open_db(db_path).execute("SELECT count(*) FROM map_words_read").fetchone()[0]
        except Exception:  # not yet created
            return 0

    def kill_the_actor():
        deadline = time.time() + 120
        while time.time() < deadline:
            if read_count() > 0:
                actor = ray_cluster.get_actor(f"mapclip-ocr-{os.getpid()}-0", namespace=NAMESPACE)
                killed["at"] = read_count()
                ray_cluster.kill(actor, no_restart=False)  # as a crash or a lost node would
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_actor)
    killer.start()
    lines = []
    fetcher = Fetcher()
    try:
        code = run_ocr(db_path, OcrSettings(threads=1), fetcher=fetcher, ray=ray_options(threads=1), progress=False,
                       echo=lines.append)
    finally:
        fetcher.close()
        killer.join()
    assert code == 0, lines
    assert 0 < killed["at"] < 40, killed
    assert "read 40 maps" in lines[-1] and "0 failed" in lines[-1], lines
    db = open_db(db_path)
    assert db.execute("SELECT count(*), count(DISTINCT map_id) FROM map_words_read").fetchone()[:] == (40, 40)
    assert db.execute("SELECT count(*) FROM load_errors").fetchone()[0] == 0
