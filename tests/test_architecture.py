"""The shape of the code: imports point one way, the store owns its SQL, no import changes the process,
the native SQL-function bridge releases what it holds, and index caches do not pile up."""

from __future__ import annotations

import ast
import gc
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("datasette_mapclip", "loaders", "fine_tune")


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports (absolute imports; relative ones stay inside it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package,forbidden", [
    ("datasette_mapclip", {"loaders", "fine_tune"}),
    ("loaders", {"fine_tune"}),
])
def test_dependencies_point_one_way(package, forbidden):
    offenders = {str(path.relative_to(REPO)): sorted(imported_packages(path) & forbidden)
                 for path in modules_of(package) if imported_packages(path) & forbidden}
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_core_and_its_command_root_load_without_the_other_packages():
    out = run_python("""
        import importlib, pkgutil, sys
        import datasette_mapclip
        for info in pkgutil.walk_packages(datasette_mapclip.__path__, "datasette_mapclip."):
            importlib.import_module(info.name)
        from datasette_mapclip.cli import cli
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("loaders", "fine_tune")))
    """)
    assert out.strip() == "[]"


def test_importing_every_module_changes_no_process_wide_setting():
    """Pillow's limits, torch's threads and the Hugging Face offline switch belong to the entry point."""
    out = run_python("""
        import importlib, pkgutil
        import torch
        from PIL import Image, ImageFile
        from huggingface_hub import constants
        before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, torch.get_num_threads(),
                  constants.HF_HUB_OFFLINE)
        for package in ("datasette_mapclip", "loaders", "fine_tune"):
            module = importlib.import_module(package)
            for info in pkgutil.walk_packages(module.__path__, package + "."):
                if not info.name.endswith("__main__"):
                    importlib.import_module(info.name)
        after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, torch.get_num_threads(),
                 constants.HF_HUB_OFFLINE)
        print(before == after, before, after)
    """)
    assert out.startswith("True"), out


OWN_TABLES = ("maps", "maps_fts", "items", "models", "load_errors", "loads", "mapclip_meta")
SQL_ON_OWN_TABLE = re.compile(
    r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+\[?(" + "|".join(OWN_TABLES) + r")\b(?!\.)", re.IGNORECASE)
# an f-string of SQL (its keywords in capitals, as this project writes SQL) naming a table at run time
SQL_TABLE_SLOT = re.compile(r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+\[?$")
SQL_START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WITH|REPLACE)\b")
# The store (its folder) owns the schema; search/sql.py builds the search SQL that is shown to users.
def owns_sql(name: str) -> bool:
    return name.startswith("datasette_mapclip/store/") or name == "datasette_mapclip/search/sql.py"


def test_sql_on_the_projects_own_tables_lives_in_the_store():
    offenders = []
    for package in PACKAGES:
        for path in modules_of(package):
            name = str(path.relative_to(REPO))
            if owns_sql(name):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_ON_OWN_TABLE.search(node.value):
                    offenders.append(f"{name}:{node.lineno}: {node.value.strip()[:60]!r}")
                # a table named at run time (the vector tables, sqlite-vec's shadow tables)
                if isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant) \
                        and SQL_START.match(str(node.values[0].value)) and any(
                        isinstance(part, ast.Constant) and SQL_TABLE_SLOT.search(part.value)
                        and isinstance(following, ast.FormattedValue)
                        for part, following in zip(node.values, node.values[1:])):
                    offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)[:60]!r}")
    assert not offenders, "SQL on the project's tables outside the store:\n" + "\n".join(offenders)


def test_field_lists_derive_from_map_record():
    from datasette_mapclip import store
    from datasette_mapclip.store.records import RECORD_FIELDS, MapRecord

    conn = store.connect(":memory:")
    store.MapStore(":memory:", conn=conn)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(maps)")}
    assert set(RECORD_FIELDS) <= columns
    assert set(RECORD_FIELDS) == set(MapRecord.__dataclass_fields__)


# -- the native SQL-function bridge -----------------------------------------------------

def _functions():
    from datasette_mapclip.search.sql_functions import DatabaseFunctions

    return DatabaseFunctions(lambda: [], lambda: {}, lambda row, config: None)


def test_native_registration_is_released_when_connections_close(tmp_path):
    from datasette_mapclip.search import sqlite_native
    from datasette_mapclip.search.sql_functions import register
    from datasette_mapclip.store import connect

    gc.collect()
    before = sqlite_native.registered_count()
    connections = [connect(tmp_path / f"{i}.db") for i in range(20)]
    paths = {register(conn, _functions()) for conn in connections}
    assert paths == {"native"}
    assert sqlite_native.registered_count() == before + 20 * 4
    message = None
    try:
        connections[0].execute("select mapclip_combine(x'0000803f', 1, x'0000803f')").fetchone()
    except Exception as error:
        message = str(error)
    assert "takes pairs" in message  # the real message reached SQL
    for conn in connections:
        conn.close()
    gc.collect()
    assert sqlite_native.registered_count() == before


def test_native_path_refuses_what_it_cannot_verify(tmp_path):
    import sqlite3

    from datasette_mapclip.search import sqlite_native
    from datasette_mapclip.search.sql_functions import register
    from datasette_mapclip.store import connect

    plain = sqlite3.connect(":memory:")  # the standard library's module: no verified handle
    assert sqlite_native.connection_handle(plain) is None
    assert register(plain, _functions()) == "python"
    assert plain.execute("select mapclip_similarity(x'0000803f', x'0000803f')").fetchone()[0] == 1.0

    closed = connect(tmp_path / "closed.db")
    closed.close()
    assert sqlite_native.connection_handle(closed) is None

    class NotAConnection:
        def execute(self, *args):
            raise AssertionError("never called")

    assert sqlite_native.connection_handle(NotAConnection()) is None
    assert sqlite_native.connection_handle(connect(tmp_path / "open.db")) is not None


def test_unreadable_memory_is_reported_not_dereferenced():
    from datasette_mapclip.search import sqlite_native

    assert sqlite_native._read_memory(8, 8) is None  # page zero is never mapped
    value = np.array([42], dtype=np.int64)
    assert sqlite_native._read_memory(value.ctypes.data, 8) == value.tobytes()


# -- index caches -------------------------------------------------------------------------

def test_a_changed_database_leaves_one_index_cache(tmp_path, tiny_encoder):
    from datasette_mapclip.search import index
    from datasette_mapclip.store import MapStore
    from datasette_mapclip.store.records import MapRecord

    db_path = tmp_path / "maps.db"
    store = MapStore(db_path)
    model = store.register_model(tiny_encoder.provenance())
    config = {"int8_min_rows": 1}

    def add(first, count):
        records = [MapRecord(source_id=f"m{i}", location=f"/x/{i}.jpg", source="test") for i in range(first, first + count)]
        matrix = np.random.default_rng(first).standard_normal((count, model["dim"])).astype(np.float32)
        store.write_batch(model, records, matrix / np.linalg.norm(matrix, axis=1, keepdims=True))

    add(0, 30)
    assert len(index.build_for(str(db_path), model, config)) == 30
    for step in range(3):
        add(100 + 10 * step, 10)
        assert len(index.build_for(str(db_path), model, config)) == 40 + 10 * step
        caches = sorted(p.name for p in tmp_path.iterdir() if ".mapclip-index" in p.name)
        assert len(caches) == 1, caches
    assert caches[0] == index.cache_folder(str(db_path), model["vector_table"], config).name
    store.close()


def test_no_module_imports_another_modules_private_names():
    """A name starting with "_" belongs to its module: another module that needs it needs a public
    name (the Ray engine once imported the local pipeline's private helpers)."""
    found = []
    for package in PACKAGES:
        for path in modules_of(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__" and (
                        node.level or (node.module or "").split(".")[0] in PACKAGES):
                    found += [f"{path.relative_to(REPO)}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert found == []


def test_the_plugins_urls_are_built_in_one_place():
    """Every path of the plugin's pages comes from web/urls.py's MapclipUrls (routes included): no
    module or template writes one itself."""
    found = []
    for path in modules_of("datasette_mapclip"):
        if path.relative_to(REPO) == Path("datasette_mapclip/web/urls.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/-/mapclip" in node.value \
                    and not node.value.lstrip().startswith(("``", "The ", "A ")) and "\n" not in node.value:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:60]!r}")
    for template in (REPO / "datasette_mapclip" / "templates").glob("*.html"):
        if "/-/mapclip" in template.read_text():
            found.append(str(template.relative_to(REPO)))
    assert found == []


# The core's layers: web -> search -> store and model; store may read model/provenance.py (what a
# models row says), model imports none of the others.  Datasette is the web layer's alone, so the
# search service runs for the CLI and Python with no server.
LAYERS = {
    "model": {"store", "search", "web"},
    "store": {"search", "web"},
    "search": {"web"},
}


def core_imports(path: Path) -> set[str]:
    """The core's folders a module imports (relative imports resolved)."""
    parts = path.relative_to(REPO / "datasette_mapclip").parts
    package = list(parts[:-1]) if parts[-1] != "__init__.py" else list(parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                module = base + (node.module.split(".") if node.module else [])
                names = [module + [alias.name] for alias in node.names] if not node.module else [module]
            elif node.module and node.module.startswith("datasette_mapclip"):
                names = [node.module.split(".")[1:]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.startswith("datasette_mapclip.")]
        found |= {name[0] for name in names if name}
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_the_cores_layers_import_downwards_only(layer):
    offenders = {}
    for path in sorted((REPO / "datasette_mapclip" / layer).rglob("*.py")):
        upward = core_imports(path) & LAYERS[layer]
        if upward:
            offenders[str(path.relative_to(REPO))] = sorted(upward)
    assert not offenders, f"{layer}/ imports from layers above it: {offenders}"


@pytest.mark.parametrize("layer", ["model", "store", "search"])
def test_only_the_web_layer_imports_datasette(layer):
    offenders = [str(path.relative_to(REPO)) for path in sorted((REPO / "datasette_mapclip" / layer).rglob("*.py"))
                 if "datasette" in imported_packages(path)]
    assert not offenders


def test_fine_tuning_does_not_import_its_demo():
    """The demo uses fine-tuning; fine-tuning never reaches up into the demo."""
    offenders = []
    for path in modules_of("fine_tune"):
        if "demo" in path.relative_to(REPO / "fine_tune").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                    (node.level and (node.module or "").split(".")[0] == "demo")
                    or (not node.level and (node.module or "").startswith("fine_tune.demo"))):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders


def test_the_architecture_page_names_every_module():
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(path.relative_to(REPO)) for package in PACKAGES for path in modules_of(package)
               if path.name not in ("__init__.py", "__main__.py")
               and not re.search(rf"\b{re.escape(path.stem)}(\.py)?\b", page)]
    assert not missing, f"docs/architecture.md does not name: {missing}"
