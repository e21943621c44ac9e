import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import draw_map, make_folder, open_db
from datasette_mapclip.model.images import open_image
from datasette_mapclip.store import MapStore


def test_folder_load_stores_metadata_vectors_thumbnails_and_errors(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 10, formats=("JPEG", "PNG", "TIFF", "GIF", "WEBP"))
    draw_map(50).save(folder / "whole.jpg", "JPEG")
    (folder / "broken.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:700])
    (folder / "whole.jpg").unlink()
    (folder / "page.png").write_bytes(b"<!DOCTYPE html><html>Forbidden</html>")
    (folder / "empty.tif").write_bytes(b"")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "10 loaded, 0 skipped (already stored), 3 failed" in out.output

    db = open_db(tmp_path / "m.db")
    maps = {r["source_id"]: r for r in db.execute("SELECT * FROM maps")}
    assert len(maps) == 10
    row = maps["sheet_0002.tif"]
    assert (row["title"], row["date"], row["year"], row["place"]) == ("Map number 2 of Vermont", "[ca. 1802]", 1802, "Vermont")
    assert json.loads(row["subjects"]) == ["Relief", "Roads"]
    assert (row["width"], row["height"]) == (320, 240)
    assert Image.open(io.BytesIO(row["thumbnail"])).format == "JPEG"
    # multi-sheet items keep their sheets together
    atlas = db.execute("SELECT source_id, sheet FROM maps WHERE item_id = 'atlas-1' ORDER BY sheet").fetchall()
    assert [tuple(r) for r in atlas] == [("atlas/sheet_0000.jpg", 1), ("atlas/sheet_0005.jpg", 2)]
    assert db.execute("SELECT sheet_count FROM items WHERE item_id = 'atlas-1'").fetchone()[0] == 2
    errors = {r["source_id"]: (r["stage"], r["reason"]) for r in db.execute("SELECT * FROM load_errors")}
    assert errors["empty.tif"] == ("decode", "empty file (0 bytes)")
    assert errors["page.png"] == ("decode", "not an image: the server sent an HTML page")
    assert "truncated" in errors["broken.jpg"][1] or "cannot decode" in errors["broken.jpg"][1]
    load = db.execute("SELECT * FROM loads").fetchone()
    assert (load["status"], load["loaded"], load["failed"]) == ("finished", 10, 3)

    # a rerun embeds nothing twice; a fixed file is picked up and its error row goes away
    draw_map(99).save(folder / "broken.jpg", "JPEG")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "1 loaded, 10 skipped (already stored), 2 failed" in out.output
    assert db.execute("SELECT count(*) FROM maps").fetchone()[0] == 11
    assert db.execute("SELECT attempts FROM load_errors WHERE source_id = 'empty.tif'").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM load_errors WHERE source_id = 'broken.jpg'").fetchone()[0] == 0


def test_stored_vector_equals_open_clip_output_for_the_same_image(tmp_path, invoke, model_args, tiny_encoder):
    folder = make_folder(tmp_path / "scans", 3, formats=("PNG",), metadata=False)
    invoke(["load", "folder", tmp_path / "m.db", folder, *model_args, "--precision", "fp32"])
    store = MapStore(tmp_path / "m.db")
    ids, matrix = store.vectors()
    paths = [r[0] for r in store.conn.execute("SELECT source_id FROM maps ORDER BY id")]
    # open_clip's own path: its transform on the PIL image, encode_image, L2-normalise
    model, transform = tiny_encoder.model, tiny_encoder.image_transform
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(folder / p).convert("RGB")) for p in paths])
        expected = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(matrix, expected, atol=1e-5)


def test_jpeg_draft_decode_stays_close_to_full_decode(tiny_encoder, tmp_path):
    path = tmp_path / "big.jpg"
    draw_map(7, size=(1600, 1200)).save(path, quality=90)
    fast = tiny_encoder.encode_images([open_image(path.read_bytes(), min_size=tiny_encoder.image_size)])
    full = tiny_encoder.encode_images([Image.open(path).convert("RGB")])
    assert float(fast[0] @ full[0]) > 0.99


def test_metadata_csv_without_file_column_is_a_clear_error(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    (folder / "metadata.csv").write_text("filename,title,\x1b]0;pwned\x07\nsheet_0001.jpg,A map,x\n")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args], expect=1)
    assert "needs a 'file' column" in out.output and "Traceback" not in out.output
    # the header is quoted with its control characters escaped: no terminal escape sequence
    assert "it has: filename, title, \\x1b]0;pwned\\x07." in out.output
    assert "\x1b" not in out.output and "\x07" not in out.output


def _count(db_path):
    if not os.path.exists(db_path):
        return 0
    try:
        db = open_db(db_path)
        return db.execute("SELECT count(*) FROM maps").fetchone()[0]
    except Exception:
        return 0


def test_killed_load_resumes_with_every_image_exactly_once(tmp_path, model_args):
    """SIGKILL a folder load at random points, rerun to completion, check nothing is lost or doubled."""
    folder = make_folder(tmp_path / "scans", 300, formats=("JPEG", "PNG"), metadata=False)
    db_path = tmp_path / "m.db"
    command = [sys.executable, "-m", "datasette_mapclip.cli", "load", "folder", str(db_path), str(folder), *model_args,
               "--batch-size", "8", "--workers", "2", "--threads", "1"]
    rng = random.Random(7)
    kills = 0
    for attempt in range(4):
        before = _count(db_path)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this run has written something, then kill it after a random extra delay
        deadline = time.time() + 120
        while _count(db_path) <= before and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if _count(db_path) == 300:
            break
    assert kills >= 1, "the load finished before it could be killed"
    assert _count(db_path) < 300
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    db = open_db(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = MapStore(db_path)
    table = store.model()["vector_table"]
    assert db.execute("SELECT count(*), count(DISTINCT source_id) FROM maps").fetchone()[:] == (300, 300)
    assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 300
    # every map has its vector, and no vector is orphaned
    assert db.execute(f"SELECT count(*) FROM maps WHERE id NOT IN (SELECT map_id FROM {table})").fetchone()[0] == 0
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".jpg", ".png")}
    assert {r[0] for r in db.execute("SELECT source_id FROM maps")} == expected
    statuses = [r[0] for r in db.execute("SELECT status FROM loads ORDER BY id")]
    # killed runs never finished; a later run found their processes gone and said so
    assert statuses[-1] == "finished" and statuses.count("killed") == kills and "running" not in statuses


def test_locations_are_relative_to_the_collection_files_folder_and_read_back_from_anywhere(
        tmp_path, invoke, model_args, monkeypatch):
    """No path of the loading machine in the file where the images lie beside it; `fine-tune
    register` and re-embedding still re-read the images from another directory."""
    from datasette_mapclip.store import read_maps_readonly

    make_folder(tmp_path / "work" / "scans", 3)
    (tmp_path / "elsewhere").mkdir()
    draw_map(7).save(tmp_path / "elsewhere" / "other.jpg", "JPEG")
    monkeypatch.chdir(tmp_path / "work")
    invoke(["load", "folder", "maps.db", "scans", *model_args])
    invoke(["load", "folder", "maps.db", str(tmp_path / "elsewhere"), *model_args])
    conn = open_db(tmp_path / "work" / "maps.db")
    locations = [row[0] for row in conn.execute("SELECT location FROM maps ORDER BY id")]
    assert locations[:3] == ["scans/atlas/sheet_0000.jpg", "scans/sheet_0001.jpg", "scans/sheet_0002.jpg"]
    # a folder outside the collection's keeps its absolute path (publish-copy makes it relative)
    assert locations[3] == str((tmp_path / "elsewhere" / "other.jpg").resolve())
    monkeypatch.chdir(tmp_path)
    for row in read_maps_readonly(tmp_path / "work" / "maps.db", ("location",)):
        assert Path(row["location"]).is_absolute() and Path(row["location"]).is_file(), row
    store = MapStore(tmp_path / "work" / "maps.db")
    records, _ = store.stored_records()
    store.close()
    assert all(Path(record.location).is_file() for record in records) and len(records) == 4


def test_a_last_batch_of_only_undecodable_files_is_recorded_and_counted(tmp_path, invoke, model_args):
    """Issue 18 (12a): the failures after the last full batch of good images are written by the
    final flush, which has no image to embed; each must still be a load_errors row and counted."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for n in range(2):
        draw_map(n).save(folder / f"a_good_{n}.jpg", "JPEG")  # sorted first: one full batch of 2
    (folder / "z_empty.jpg").write_bytes(b"")
    (folder / "z_html.png").write_bytes(b"<!DOCTYPE html><html>Forbidden</html>")
    (folder / "z_text.tif").write_bytes(b"not a tiff at all")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args, "--batch-size", "2", "--workers", "1"])
    assert "2 loaded, 0 skipped (already stored), 3 failed" in out.output, out.output
    db = open_db(tmp_path / "m.db")
    errors = {r["source_id"]: r["stage"] for r in db.execute("SELECT * FROM load_errors")}
    assert errors == {"z_empty.jpg": "decode", "z_html.png": "decode", "z_text.tif": "decode"}
    load = db.execute("SELECT * FROM loads").fetchone()
    assert (load["status"], load["loaded"], load["failed"]) == ("finished", 2, 3)


def test_the_recorded_size_is_the_maps_own_not_the_decoded_scale(tmp_path, invoke, model_args):
    """A JPEG is decoded near the model's input size (draft mode); the map page shows the size of the
    map itself, turned as its EXIF says."""
    folder = tmp_path / "scans"
    folder.mkdir()
    draw_map(1, size=(1600, 1200)).save(folder / "wide.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter
    draw_map(2, size=(1600, 1200)).save(folder / "turned.jpg", "JPEG", exif=exif)
    invoke(["load", "folder", tmp_path / "m.db", folder, *model_args, "--no-thumbnails"])
    db = open_db(tmp_path / "m.db")
    sizes = {r["source_id"]: (r["width"], r["height"]) for r in db.execute("SELECT source_id, width, height FROM maps")}
    assert sizes == {"wide.jpg": (1600, 1200), "turned.jpg": (1200, 1600)}
