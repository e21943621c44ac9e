"""Where a model's weights are found: a ``models`` row records the checkpoint's SHA-256 and file
name, never the loading machine's directory; a server finds the weights by hash, through the
``checkpoints:`` configuration or this machine's checkpoint registry (datasette_mapclip/model/provenance.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY_MODEL, load_collection, make_datasette, save_tiny_checkpoint
from datasette_mapclip.model.clip import ModelUnavailable, file_sha256
from datasette_mapclip.model.encoders import resolve_checkpoint
from datasette_mapclip.model.provenance import (
    REGISTRY_ENV,
    recorded_file_name,
    remember_checkpoint,
    remembered_checkpoints,
    row_provenance,
)
from datasette_mapclip.store import MapStore


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch) -> Path:
    """Each test its own checkpoint registry (never the user's ~/.cache)."""
    path = tmp_path / "registry"
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_args):
    """A collection loaded on this machine with the tiny checkpoint (the registry of the module's own),
    without query encoders: searching it needs the weights, found as this module checks."""
    import os

    before = os.environ.get(REGISTRY_ENV)
    loading_registry = tmp_path_factory.mktemp("loading-registry")
    os.environ[REGISTRY_ENV] = str(loading_registry)
    try:
        db_path, _ = load_collection(tmp_path_factory, [*model_args, "--no-encoders"], 6)
    finally:
        if before is None:
            os.environ.pop(REGISTRY_ENV)
        else:
            os.environ[REGISTRY_ENV] = before
    return db_path, loading_registry


def model_row(db_path) -> dict:
    store = MapStore(db_path)
    try:
        return store.model()
    finally:
        store.close()


def row_for(checkpoint: str, path_recorded=None) -> dict:
    digest = file_sha256(checkpoint)
    return {"name": f"{TINY_MODEL}/sha256:{digest[:12]}", "architecture": TINY_MODEL, "pretrained": None,
            "checkpoint_path": path_recorded, "checkpoint_sha256": digest, "dim": 64}


def test_a_models_row_records_the_hash_and_file_name_not_the_directory(tmp_path, tiny_encoder, tiny_checkpoint):
    store = MapStore(tmp_path / "maps.db")
    row = store.register_model(tiny_encoder.provenance())
    store.close()
    assert row["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert row["checkpoint_path"] == "tiny.pt"
    directory = str(Path(tiny_checkpoint).parent)
    assert not any(directory in str(value) for value in row.values())
    # ... and the loading machine remembers where the file is, by hash, outside the database
    assert remembered_checkpoints(row["checkpoint_sha256"]) == [str(Path(tiny_checkpoint).resolve())]


def test_file_names_are_cut_from_posix_and_windows_paths():
    assert recorded_file_name("/home/alice/run/best.pt") == "best.pt"
    assert recorded_file_name("C:\\Users\\alice\\run\\best.pt") == "best.pt"
    assert recorded_file_name("best.pt") == "best.pt"
    assert recorded_file_name(None) is None and recorded_file_name("") is None
    assert row_provenance({"name": "x", "checkpoint_path": None, "checkpoint_sha256": None})["checkpoint_path"] is None


@pytest.mark.asyncio
async def test_serving_on_the_loading_machine_needs_no_configuration(served, monkeypatch):
    db_path, loading_registry = served
    assert model_row(db_path)["checkpoint_path"] == "tiny.pt"
    monkeypatch.setenv(REGISTRY_ENV, str(loading_registry))
    response = await make_datasette([str(db_path)]).client.get("/-/mapclip/search.json?q=relief")
    assert response.status_code == 200 and len(response.json()["results"]) == 6


@pytest.mark.asyncio
async def test_a_server_elsewhere_finds_the_weights_only_through_checkpoints_config(served, tmp_path, monkeypatch,
                                                                                     tiny_checkpoint):
    served, _ = served
    monkeypatch.setenv(REGISTRY_ENV, "off")  # another machine: it never saw the weights
    row = model_row(served)
    unconfigured = await make_datasette([str(served)]).client.get("/-/mapclip/search.json?q=relief")
    assert unconfigured.status_code == 503
    error = unconfigured.json()["error"]
    assert "were not found on this server" in error and row["checkpoint_sha256"] in error
    assert "a file named tiny.pt" in error and "checkpoints" in error
    # the weights shipped in the image: a path relative to the server's working directory (/app there)
    (tmp_path / "app" / "weights").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, tmp_path / "app" / "weights" / "tiny.pt")
    monkeypatch.chdir(tmp_path / "app")
    config = {"plugins": {"datasette-mapclip": {"checkpoints": {row["name"]: "weights/tiny.pt"}}}}
    configured = await make_datasette([str(served)], metadata=config).client.get("/-/mapclip/search.json?q=relief")
    assert configured.status_code == 200 and len(configured.json()["results"]) == 6


@pytest.mark.parametrize("key", ["name", "sha256", "sha256:", "prefix"])
def test_a_checkpoints_entry_may_be_keyed_by_model_name_or_hash(key, tiny_checkpoint, tmp_path):
    copy = shutil.copy(tiny_checkpoint, tmp_path / "copy.pt")
    row = row_for(tiny_checkpoint)
    digest = row["checkpoint_sha256"]
    keys = {"name": row["name"], "sha256": digest, "sha256:": f"sha256:{digest}", "prefix": digest[:12]}
    assert resolve_checkpoint(row, {"checkpoints": {keys[key]: str(copy)}}) == str(copy)


def test_a_path_recorded_in_the_database_is_never_opened(tiny_checkpoint, monkeypatch):
    """Even where the recorded absolute path exists and holds the right weights (an old database
    served on the loading machine): a database does not name files for the server to open."""
    row = row_for(tiny_checkpoint, path_recorded=str(Path(tiny_checkpoint).resolve()))
    opened = []
    monkeypatch.setattr("datasette_mapclip.model.encoders.file_sha256", lambda path: opened.append(path) or "0" * 64)
    with pytest.raises(ModelUnavailable, match="were not found on this server") as raised:
        resolve_checkpoint(row, {})
    assert opened == [] and "tried: nothing" in str(raised.value)
    assert str(Path(tiny_checkpoint).parent) not in str(raised.value)


def test_other_weights_are_refused_wherever_they_are_named(tiny_checkpoint, tmp_path):
    row = row_for(tiny_checkpoint)
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=99)
    with pytest.raises(ModelUnavailable, match="SHA-256 does not match"):
        resolve_checkpoint(row, {"checkpoints": {row["name"]: str(other)}})
    remember_checkpoint(other, row["checkpoint_sha256"])  # a registry entry whose file was overwritten
    with pytest.raises(ModelUnavailable, match="registry: different weights"):
        resolve_checkpoint(row, {})


def test_the_registry_tries_every_path_seen_with_a_hash(tiny_checkpoint, tmp_path):
    row = row_for(tiny_checkpoint)
    digest = row["checkpoint_sha256"]
    kept = shutil.copy(tiny_checkpoint, tmp_path / "kept.pt")
    remember_checkpoint(kept, digest)
    remember_checkpoint(tmp_path / "deleted-since.pt", digest)  # newest entry, file gone
    assert remembered_checkpoints(digest) == [str(tmp_path / "deleted-since.pt"), str(kept)]
    assert resolve_checkpoint(row, {}) == str(kept)
    # a configured copy comes first
    configured = shutil.copy(tiny_checkpoint, tmp_path / "configured.pt")
    assert resolve_checkpoint(row, {"checkpoints": {digest: str(configured)}}) == str(configured)


def test_a_hash_from_a_database_is_never_a_path(tmp_path, registry):
    (registry / "x").mkdir(parents=True)
    (registry / "x" / "a.path").write_text("/etc/passwd")
    assert remembered_checkpoints("../x") == [] and remembered_checkpoints("x") == []
    assert remember_checkpoint(tmp_path / "a.pt", "../../escape") is None
    row = {"name": "m", "architecture": TINY_MODEL, "pretrained": None, "checkpoint_path": None,
           "checkpoint_sha256": "../x", "dim": 64}
    with pytest.raises(ModelUnavailable, match="not one"):
        resolve_checkpoint(row, {})


def test_the_registry_can_be_turned_off_and_never_breaks_a_load(tiny_checkpoint, tmp_path, monkeypatch):
    digest = file_sha256(tiny_checkpoint)
    monkeypatch.setenv(REGISTRY_ENV, "off")
    assert remember_checkpoint(tiny_checkpoint, digest) is None and remembered_checkpoints(digest) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(REGISTRY_ENV, str(blocker / "registry"))  # cannot be created: no error, nothing kept
    assert remember_checkpoint(tiny_checkpoint, digest) is None


def test_old_databases_lose_the_directory_when_a_loader_opens_them(tmp_path, tiny_encoder, tiny_checkpoint):
    store = MapStore(tmp_path / "old.db")
    row = store.register_model(tiny_encoder.provenance())
    store.conn.execute("UPDATE models SET checkpoint_path = ?", (str(Path(tiny_checkpoint).resolve()),))
    # a file from before the migration: it has no record of it
    store.conn.execute("DELETE FROM mapclip_meta WHERE key = 'migration:checkpoint-file-names-only'")
    store.close()
    shutil.rmtree(tmp_path / "registry", ignore_errors=True)
    reopened = MapStore(tmp_path / "old.db")
    assert reopened.model()["checkpoint_path"] == "tiny.pt"
    reopened.close()
    assert remembered_checkpoints(row["checkpoint_sha256"]) == [str(Path(tiny_checkpoint).resolve())]


def test_the_image_tower_is_read_from_the_file_only_when_an_image_query_needs_it(tmp_path_factory, model_args,
                                                                                monkeypatch):
    """A server's encoder holds the text tower; the image tower (the larger file) is read, and
    checked against its SHA-256, at the first image query."""
    from conftest import draw_map, load_collection
    from datasette_mapclip.model.encoders import EncoderCache
    from datasette_mapclip.store import MapStore
    from datasette_mapclip.store.reads import StoredQueryEncoders

    db_path, _ = load_collection(tmp_path_factory, model_args, 4)
    store = MapStore(db_path)
    row = dict(store.model())
    store.close()
    read = []
    real_part = StoredQueryEncoders._part
    monkeypatch.setattr(StoredQueryEncoders, "_part",
                        lambda self, part, sha256, conn=None: read.append(part) or real_part(self, part, sha256, conn))
    stored = StoredQueryEncoders(db_path, row["name"])
    encoder = EncoderCache().get(row, {}, stored).encoder
    assert encoder.encode_texts(["relief map"]).shape == (1, row["dim"])
    assert "image" not in read and {"text", "tokenizer", "preprocess"} <= set(read)
    assert encoder.encode_images([draw_map(3)]).shape == (1, row["dim"])
    assert read.count("image") == 1
