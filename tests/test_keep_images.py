"""--keep-images: each downloaded image kept once by source id, recorded in kept_images, and read
back by `fine-tune register` (both engines) and `fine-tune dataset` with the source gone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, draw_map, open_db, save_tiny_checkpoint
from datasette_mapclip.store import MapStore, read_kept_paths_readonly
from loc_server import map_image


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second mapclip-tiny (another seed): the "fine-tuned" model to register."""
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("other") / "other.pt", seed=4242))


def vectors(db_path, model_name=None) -> dict:
    store = MapStore(db_path)
    ids, matrix = store.vectors(model_name)
    source_ids = dict(store.conn.execute("SELECT id, source_id FROM maps").fetchall())
    store.close()
    return {source_ids[i]: v for i, v in zip(ids, matrix)}


def register_args(db_path, checkpoint, *extra):
    return ["fine-tune", "register", db_path, "--checkpoint", checkpoint, "--model", TINY_MODEL, "--precision", "fp32",
            "--quiet", *extra]


@pytest.fixture
def kept_collection(tmp_path, invoke, model_args, loc_server, other_checkpoint):
    """A loc.gov stand-in load with --keep-images, plus the second model's vectors made from the
    network (the reference), then the server stopped."""
    server = loc_server(items=5, per_page=4, sheets={2: 2}, bad={4: "missing"})
    url = f"{server.url}/collections/test-maps/"
    keep = tmp_path / "kept"
    out = invoke(["load", "loc", tmp_path / "maps.db", url, "--rate", "0", "--keep-images", keep, *model_args])
    assert "5 loaded, 0 skipped (already stored), 1 failed" in out.output
    assert "0 read from kept images, 5 newly kept" in out.output
    invoke(["load", "loc", tmp_path / "reference.db", url, "--rate", "0", "--model", TINY_MODEL,
            "--checkpoint", other_checkpoint, "--precision", "fp32", "--quiet"])
    server.stop()
    return tmp_path / "maps.db", keep, vectors(tmp_path / "reference.db")


def test_kept_images_are_the_downloads_once_by_source_id(kept_collection):
    db_path, keep, _ = kept_collection
    rows = open_db(db_path).execute("SELECT source_id, root, path, bytes FROM kept_images").fetchall()
    maps = {row[0] for row in open_db(db_path).execute("SELECT source_id FROM maps")}
    assert {row["source_id"] for row in rows} == maps and len(rows) == 5
    for row in rows:
        assert row["root"] == str(keep.resolve())
        file = keep / row["path"]
        service = row["source_id"].rsplit("/full/", 1)[0]
        # the IIIF derivative exactly as the server sent it: re-embedding reads the same pixels
        assert file.read_bytes() == map_image(service) and row["bytes"] == file.stat().st_size
        assert file.suffix == ".jpg" and len(file.relative_to(keep).parts) == 3  # ab/cd/<sha256>.jpg
    assert sorted(p.name for p in keep.rglob("*") if p.is_file()) == sorted(Path(r["path"]).name for r in rows)


def test_register_reads_kept_images_with_the_source_gone(kept_collection, invoke, other_checkpoint, tmp_path):
    db_path, keep, reference = kept_collection
    out = invoke(register_args(db_path, other_checkpoint))
    assert "5 loaded, 0 skipped (already stored), 0 failed" in out.output
    assert "5 read from kept images, 0 newly kept" in out.output
    registered = vectors(db_path, MapStore(db_path).models()[-1]["name"])
    assert registered.keys() == reference.keys()
    for key in reference:  # the kept bytes are the downloaded bytes: the same vectors as from the network
        np.testing.assert_allclose(registered[key], reference[key], atol=1e-6)

    # fine-tune dataset lists the kept files, so training never fetches either
    pairs = tmp_path / "pairs"
    invoke(["fine-tune", "dataset", db_path, pairs, "--split", "0.6", "0.2", "0.2"])
    images = [line.split(",")[2] for split in ("train", "validation", "test")
              for line in (pairs / f"{split}.csv").read_text().splitlines()[1:]]
    assert len(images) == 5 and all(Path(i).is_file() and Path(i).is_relative_to(keep.resolve()) for i in images)
    assert json.loads((pairs / "dataset.json").read_text())["images_from_kept_files"] == 5


def test_register_through_ray_reads_kept_images_with_the_source_gone(ray_cluster, kept_collection, invoke,
                                                                      other_checkpoint):
    db_path, _, reference = kept_collection
    out = invoke(register_args(db_path, other_checkpoint, "--engine", "ray", "--batch-size", "2"))
    assert "5 loaded, 0 skipped (already stored), 0 failed" in out.output
    assert "5 read from kept images" in out.output
    registered = vectors(db_path, MapStore(db_path).models()[-1]["name"])
    assert registered.keys() == reference.keys()
    assert min(float(registered[k] @ reference[k]) for k in reference) >= 0.9999


def test_a_kept_file_that_is_gone_or_damaged_is_fetched_again_and_kept(tmp_path, invoke, model_args, loc_server,
                                                                        other_checkpoint):
    server = loc_server(items=4, per_page=4)
    url = f"{server.url}/collections/test-maps/"
    keep = tmp_path / "kept"
    invoke(["load", "loc", tmp_path / "m.db", url, "--rate", "0", "--keep-images", keep, *model_args])
    files = {row[0]: keep / row[1] for row in open_db(tmp_path / "m.db").execute("SELECT source_id, path FROM kept_images")}
    gone, damaged = sorted(files)[:2]
    files[gone].unlink()
    files[damaged].write_bytes(b"\xff\xd8\xff not a jpeg any more")
    before = len(server.requests)
    out = invoke(register_args(tmp_path / "m.db", other_checkpoint, "--keep-images", keep))
    assert "4 loaded, 0 skipped (already stored), 0 failed" in out.output
    assert "2 read from kept images, 2 newly kept" in out.output
    assert len([p for p in server.requests[before:] if p.startswith("/iiif/")]) == 2
    for source_id in (gone, damaged):
        assert files[source_id].read_bytes() == map_image(source_id.rsplit("/full/", 1)[0])


def test_a_large_download_is_kept_as_a_model_sized_jpeg():
    from loaders.kept_images import keep_payload

    big = io.BytesIO()
    draw_map(1, size=(1600, 1200)).save(big, "JPEG", quality=90)
    image = Image.open(io.BytesIO(big.getvalue())).convert("RGB")
    data, extension = keep_payload(big.getvalue(), image, 512)
    kept = Image.open(io.BytesIO(data))
    assert (kept.format, extension, kept.size) == ("JPEG", ".jpg", (512, 384))
    small = io.BytesIO()
    draw_map(2, size=(300, 200)).save(small, "PNG")
    assert keep_payload(small.getvalue(), Image.open(small).convert("RGB"), 512) == (small.getvalue(), ".png")


def test_a_database_from_before_kept_images_gains_the_table(tmp_path):
    path = tmp_path / "old.db"
    store = MapStore(path)
    store.conn.execute("DROP TABLE kept_images")
    store.close()
    assert read_kept_paths_readonly(path) == {}  # read-only readers cope with the older file
    store = MapStore(path)
    with store.transaction():
        store.record_kept_image("a.jpg", "/kept", "ab/cd/x.jpg", 10)
    assert store.kept_image_path("a.jpg") == "/kept/ab/cd/x.jpg" and store.kept_images_summary() == (1, 10)
    store.close()


def test_keep_images_that_cannot_be_written_is_a_clear_error_before_any_fetch(tmp_path, invoke, model_args):
    (tmp_path / "a-file").write_text("")
    out = invoke(["load", "loc", tmp_path / "m.db", "http://127.0.0.1:9/collections/x/", "--keep-images",
                  tmp_path / "a-file" / "kept", *model_args], expect=1)
    assert "cannot write to --keep-images" in out.output and "Traceback" not in out.output


def test_keep_images_is_documented_on_every_command_that_downloads(invoke):
    for command in (["load", "loc"], ["load", "csv"], ["fine-tune", "register"]):
        out = invoke([*command, "--help"])
        assert "--keep-images" in out.output and "562,842" in out.output
