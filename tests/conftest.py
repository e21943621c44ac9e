"""Shared fixtures: a tiny open_clip model (same code path as real ones), map-like images,
and a local loc.gov stand-in.  Nothing here touches the network or downloads weights."""

from __future__ import annotations

import copy
import csv
import gc
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from loc_server import LocServer

TINY_MODEL = "mapclip-tiny"  # datasette_mapclip/model/model_configs/mapclip-tiny.json


def save_tiny_checkpoint(path: Path, seed: int) -> Path:
    """A seeded random mapclip-tiny state_dict saved like any user checkpoint."""
    import torch

    from datasette_mapclip.model.clip import import_open_clip

    torch.manual_seed(seed)
    model, _, _ = import_open_clip().create_model_and_transforms(TINY_MODEL, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def collect_garbage_between_tests():
    """Each test's garbage (servers, connections, encoders) is collected in the main thread after
    it, not by whichever worker thread of a later test happens to trigger the collector: under
    Datasette 1.0a41 a collection run inside a SQL worker thread has aborted the process
    ("PyThreadState_Get: the GIL is released"), intermittently, also before the query encoders;
    the cause is not found yet (see the session notes).  The automatic collector is off while a test
    runs, so no worker thread starts a collection."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture(scope="session", autouse=True)
def checkpoint_registry(tmp_path_factory) -> Path:
    """The checkpoints loaders remember (datasette_mapclip/model/provenance.py) go to this session's own
    registry, never the user's ~/.cache; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("checkpoint-registry")
    os.environ["MAPCLIP_CHECKPOINT_REGISTRY"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory) -> Path:
    """Exported query encoders (datasette_mapclip/model/export.py) are cached for this session only:
    each checkpoint is exported once, never into the user's ~/.cache; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("encoder-cache")
    os.environ["MAPCLIP_ENCODER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", seed=1234))


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray per test file (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024 * 1024,
             logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_args(tiny_checkpoint) -> list[str]:
    return ["--model", TINY_MODEL, "--checkpoint", tiny_checkpoint, "--quiet"]


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from datasette_mapclip.model.clip import ModelSpec, load_encoder

    return load_encoder(ModelSpec(TINY_MODEL, None, tiny_checkpoint), precision="fp32")


def draw_map(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.RandomState(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.randint(180, 250, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.randint(0, size[0]), rng.randint(0, size[1])
        draw.rectangle([x, y, x + rng.randint(10, 90), y + rng.randint(10, 60)],
                       fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
        draw.line([0, rng.randint(0, size[1]), size[0], rng.randint(0, size[1])], fill=(30, 30, 90), width=2)
    return image


def make_folder(folder: Path, count: int, *, formats=("JPEG",), metadata=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    suffix = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "GIF": "gif", "WEBP": "webp"}
    for i in range(count):
        fmt = formats[i % len(formats)]
        name = f"sheet_{i:04d}.{suffix[fmt]}"
        sub = folder / ("atlas" if i % 5 == 0 else "")
        sub.mkdir(exist_ok=True)
        draw_map(i).save(sub / name, fmt)
        rows.append({
            "file": (Path("atlas") / name).as_posix() if i % 5 == 0 else name,
            "item_id": "atlas-1" if i % 5 == 0 else f"item-{i}",
            "sheet": str(i // 5 + 1) if i % 5 == 0 else "1",
            "title": f"Map number {i} of Vermont",
            "date": f"[ca. {1800 + i}]",
            "place": "Vermont",
            "subjects": "Relief;Roads",
            "format": "map",
        })
    if metadata:
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder


def load_collection(tmp_path_factory, model_args, count: int, *, fp32_encoders: bool = True):
    """A folder of ``count`` map images loaded into a fresh database with the tiny model (fp32), its
    query encoders stored at fp32 too, so a served search reproduces ``tiny_encoder`` to float
    rounding (tests/test_serving_without_torch.py checks the int8 towers a default load stores)."""
    from datasette_mapclip.cli import cli

    folder = make_folder(tmp_path_factory.mktemp("scans") / "maps", count)
    db_path = tmp_path_factory.mktemp("db") / "maps.db"
    result = CliRunner().invoke(cli, ["load", "folder", str(db_path), str(folder), *model_args, "--precision", "fp32",
                                      *(["--fp32-encoders"] if fp32_encoders else [])])
    assert result.exit_code == 0, result.output
    return db_path, folder


def public_secret_plain(db_path, folder):
    """Three databases for permission tests: two copies of a collection (``maps``, ``secret``) and
    a plain database that is not one (``plain``)."""
    import shutil
    import sqlite3

    public, secret, plain = folder / "maps.db", folder / "secret.db", folder / "plain.db"
    shutil.copy(db_path, public)
    shutil.copy(db_path, secret)
    conn = sqlite3.connect(plain)
    conn.execute("create table notes (id integer primary key, text text)")
    conn.commit()
    conn.close()
    return public, secret, plain


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def invoke(runner):
    """Run a mapclip command in-process; fail with its output if it exits non-zero unexpectedly."""
    from datasette_mapclip.cli import cli

    def run(args, expect=0):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == expect, result.output
        return result

    return run


@pytest.fixture
def loc_server():
    servers = []

    def start(**kwargs):
        server = LocServer(**kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def open_db(path):
    from datasette_mapclip.store import connect

    return connect(path)


# --- Datasette 0.65.x and the 1.0 alphas ------------------------------------------------------
# 0.65 reads plugin settings and "allow" blocks from metadata; the 1.0 alphas read them from the
# configuration (datasette.yml, ``config=``) and keep only descriptive metadata.  Tests write one
# metadata-shaped dict and make_datasette puts each part where the running Datasette reads it.
try:
    import datasette.resources  # noqa: F401  (only in the 1.0 alphas)
    DATASETTE_1 = True
except ImportError:
    DATASETTE_1 = False

CONFIG_KEYS = ("plugins", "allow", "allow_sql", "permissions", "queries")


def split_metadata(metadata: dict | None) -> tuple[dict, dict]:
    """(metadata, config) for Datasette 1.0 from a 0.65 metadata dict: plugins and permission
    blocks (at the instance, database and table level) go to config, the rest stays metadata."""
    metadata = copy.deepcopy(metadata or {})
    config = {key: metadata.pop(key) for key in CONFIG_KEYS if key in metadata}
    for db_name, db in list((metadata.get("databases") or {}).items()):
        db = dict(db)
        db_config = {key: db.pop(key) for key in CONFIG_KEYS if key in db}
        for table_name, table in list((db.get("tables") or {}).items()):
            table = dict(table)
            table_config = {key: table.pop(key) for key in CONFIG_KEYS if key in table}
            db.setdefault("tables", {})[table_name] = table
            if table_config:
                db_config.setdefault("tables", {})[table_name] = table_config
        metadata["databases"][db_name] = db
        if db_config:
            config.setdefault("databases", {})[db_name] = db_config
    return metadata, config


def make_datasette(paths, metadata: dict | None = None, **kwargs):
    """Datasette with 0.65-style ``metadata`` (plugins, allow blocks, titles) on either line."""
    from datasette.app import Datasette

    if DATASETTE_1 and metadata:
        metadata, config = split_metadata(metadata)
        return Datasette(paths, metadata=metadata or None, config=config or None, **kwargs)
    return Datasette(paths, metadata=metadata, **kwargs)


def cut_permission_checks(monkeypatch, ds, cut) -> None:
    """Replace every permission-check entry point this Datasette has (0.65 and 1.0 differ)."""
    for name in ("ensure_permissions", "permission_allowed", "ensure_permission", "allowed", "allowed_many",
                 "check_visibility"):
        if hasattr(ds, name):
            monkeypatch.setattr(ds, name, cut)


def csrf_cookies(page) -> dict:
    """0.65 checks a form's ``csrftoken`` against its ``ds_csrftoken`` cookie (asgi-csrf); the 1.0
    alphas check the browser's Sec-Fetch-Site/Origin headers instead and set no cookie."""
    return {} if DATASETTE_1 else {"ds_csrftoken": page.cookies["ds_csrftoken"]}


# What a browser sends with a form posted from the page itself (1.0 refuses a cross-site one).
SAME_ORIGIN = {"sec-fetch-site": "same-origin"}


def query_json_path(database: str) -> str:
    """Where each line answers arbitrary SQL as JSON (1.0's ``/db.json?sql=`` only redirects)."""
    return f"/{database}/-/query.json" if DATASETTE_1 else f"/{database}.json"
