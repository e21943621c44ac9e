"""The code in the README and docs/ runs as written (offline): every Python block against a
collection named ``maps.db`` (with a picture ``scan.jpg`` beside it), every SQL block through
Datasette on that collection.  Names that belong to a real collection (its ViT-B-32 vector table,
map 42) are the only things swapped for the test collection's."""

from __future__ import annotations

import re
import runpy
import shutil
from pathlib import Path

import pytest

from conftest import draw_map, load_collection, make_datasette, query_json_path
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.words import MapWord, WordStore

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for n, match in enumerate(re.finditer(rf"```{language}\n(.*?)```", path.read_text(), re.S), 1):
            found.append((f"{path.relative_to(ROOT)}#{language}{n}", match.group(1)))
    return found


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 8)
    folder = tmp_path_factory.mktemp("docs")
    shutil.copy(db_path, folder / "maps.db")
    draw_map(3).save(folder / "scan.jpg")
    store = MapStore(folder / "maps.db")
    words = WordStore(store)
    model = words.register_ocr_model({"engine": "docs-test", "engine_version": "1"})
    words.write_reading(2, model.id, [MapWord("Cape Fear", 0.9, 0.1, 0.1, 0.2, 0.05)])
    vector_table = store.model().vector_table
    with store.transaction():  # the years a real collection has, for the snippets' year filters
        store.conn.execute("UPDATE maps SET year = 1850 + id")
    store.close()
    return folder, vector_table


def test_the_docs_hold_code_to_run():
    assert len(blocks("python")) >= 1 and len(blocks("sql")) >= 2


@pytest.mark.parametrize("where,code", blocks("python"), ids=[b[0] for b in blocks("python")])
def test_python_blocks_run(collection, where, code, monkeypatch):
    folder, _ = collection
    monkeypatch.chdir(folder)
    script = folder / "block.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("where,sql", blocks("sql"), ids=[b[0] for b in blocks("sql")])
async def test_sql_blocks_run_in_datasette(collection, where, sql):
    folder, vector_table = collection
    sql = sql.replace("map_vectors_vit_b_32_openai", vector_table).replace("map_id = 42", "map_id = 2")
    ds = make_datasette([str(folder / "maps.db")])
    response = await ds.client.get(query_json_path("maps"), params={"sql": sql, "_shape": "array"})
    assert response.status_code == 200, (where, response.text[:500])
    assert response.json(), (where, "no rows")
