"""Plugin settings are declared once (settings.py): the README documents exactly those, the code
reads only those, and a value of the wrong type falls back to its default instead of breaking pages."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from conftest import load_collection, make_datasette

REPO = Path(__file__).resolve().parent.parent


def readme_setting_names() -> set[str]:
    """Keys of every ``plugins: datasette-mapclip:`` block in the user docs' YAML examples."""
    names = set()
    docs = "".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    for block in re.findall(r"```yaml\n(.*?)```", docs, re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "datasette-mapclip:":
                indent = len(line) - len(line.lstrip()) + 2
                for inner in lines[i + 1:]:
                    if inner.strip() and len(inner) - len(inner.lstrip()) < indent:
                        break
                    if len(inner) - len(inner.lstrip()) == indent and ":" in inner:
                        names.add(inner.strip().split(":", 1)[0])
    return names


def test_the_readme_documents_exactly_the_declared_settings():
    from datasette_mapclip.settings import DECLARED

    documented = readme_setting_names()
    assert documented - set(DECLARED) == set(), "documented but not declared"
    assert set(DECLARED) - documented == set(), "declared but not documented"


def test_the_code_reads_only_declared_settings():
    from datasette_mapclip.settings import DECLARED

    read = set()
    for path in (REPO / "datasette_mapclip").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"config\.get\(\"(\w+)\"", text))
        read |= set(re.findall(r"settings_of\([^()]*\)\.(\w+)", text))
        read |= set(re.findall(r"\bsettings\.(\w+)\b", text)) - {"py"}
        read |= set(re.findall(r"_setting\(\"(\w+)\"", text))
    assert read, "no setting reads found: the patterns above are stale"
    assert read - set(DECLARED) == set()


def test_values_take_their_declared_types_and_bad_ones_fall_back(caplog):
    from datasette_mapclip.settings import DECLARED, Settings

    with caplog.at_level(logging.WARNING):
        settings = Settings({"threads": "2", "rerank": "lots", "preload_model": "off", "iiif_hosts": "example.org",
                             "max_upload_bytes": -5, "index": "sometimes", "unheard_of": 1})
    assert settings.threads == 2 and settings["threads"] == 2
    assert settings.preload_model is False
    assert settings.iiif_hosts == ["example.org"]
    assert settings.rerank == DECLARED["rerank"].default
    assert settings.max_upload_bytes == DECLARED["max_upload_bytes"].default
    assert settings.index == "auto"
    assert settings.text_cache_size == DECLARED["text_cache_size"].default  # not given: the default
    for name in ("rerank", "max_upload_bytes", "index", "unheard_of"):
        assert name in caplog.text


def test_the_precision_setting_offers_what_the_model_runs_at():
    from datasette_mapclip.model.clip import PRECISIONS
    from datasette_mapclip.settings import DECLARED, Settings

    for precision in PRECISIONS:
        assert Settings({"precision": precision}).precision == precision
    assert DECLARED["precision"].default in PRECISIONS


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 6)
    return db_path


async def test_a_server_with_mistyped_settings_still_answers(collection):
    config = {"threads": "two", "max_upload_bytes": "ten megabytes", "rerank": [1], "filter_pool": None,
              "text_cache_size": -1, "index": 3, "prompt_template": 7, "iiif_hosts": {"a": 1}}
    ds = make_datasette([str(collection)], metadata={"plugins": {"datasette-mapclip": config}})
    await ds.invoke_startup()
    for path in ("/-/mapclip/search.json?q=a+map", "/-/mapclip/search.json?like=2&year_min=1",
                 "/-/mapclip?q=a+map", "/-/mapclip/map/maps/2", "/-/mapclip/about"):
        response = await ds.client.get(path)
        assert response.status_code == 200, (path, response.text[:300])
