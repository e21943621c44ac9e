"""The search service with no server: ``Collection`` searches a collection file from Python and
answers what the plugin's ``search.json`` answers, for every kind of search, reading the file only."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
import urllib.parse

import pytest

from conftest import draw_map, load_collection, make_datasette
from datasette_mapclip.search.errors import BadSearch
from datasette_mapclip.search.local import Collection


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 12)


SEARCHES = [
    {"q": "relief map", "k": 5},
    {"like": 3, "k": 4},
    {"q": "coast", "like": 2, "weight": "0.5", "k": 6},
    {"q": "map", "year_min": 1800, "year_max": 1950, "k": 5},
    {"term": ["river", "map:4"], "term_weight": ["1", "-0.5"], "k": 5},
    {"q": "chart", "more": [1], "fewer": [2], "k": 5, "page": 2},
]


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("config", [{"index": "off"}, {}])
async def test_a_file_searched_from_python_answers_as_the_server_does(collection, tmp_path, config):
    db = tmp_path / "maps.db"
    shutil.copy(collection[0], db)
    before = digest(db)
    ds = make_datasette([str(db)], metadata={"plugins": {"datasette-mapclip": config}})
    with Collection(db, settings=config) as maps:
        for search in SEARCHES:
            served = (await ds.client.get("/-/mapclip/search.json?" + urllib.parse.urlencode(search, doseq=True))).json()
            assert served["ok"], served
            here = maps.search(**search)
            if config == {}:  # the in-memory index may still be building on either side: compare maps, not the way
                here.pop("searched_with"), served.pop("searched_with")
            assert [(r["id"], r["similarity"]) for r in here["results"]] == \
                   [(r["id"], r["similarity"]) for r in served["results"]], search
            assert here["sql"] == served["sql"] and here["params"] == served["params"]
            assert [r["title"] for r in here["results"]] == [r["title"] for r in served["results"]]
            # a file has no server pages: no links to them
            assert all(r["map_url"] is None and r["record_url"] is None for r in here["results"])
    assert digest(db) == before  # searching reads the file only


async def test_an_image_searched_from_python_matches_an_upload(collection, tmp_path):
    picture = tmp_path / "query.png"
    draw_map(7).save(picture)
    with Collection(collection[0], settings={"index": "off"}) as maps:
        by_path = maps.search(image=picture, k=4)
        by_bytes = maps.search(image=picture.read_bytes(), k=4)
    assert [r["id"] for r in by_path["results"]] == [r["id"] for r in by_bytes["results"]]
    assert len(by_path["results"]) == 4


def test_bad_searches_say_what_is_wrong(collection, tmp_path):
    with Collection(collection[0], settings={"index": "off"}) as maps:
        with pytest.raises(BadSearch, match="no model named|not one of|model"):
            maps.search("map", model="no-such-model")
        with pytest.raises(BadSearch, match="weight must be"):
            maps.search("map", weight=3)
        with pytest.raises(BadSearch, match="give q"):
            maps.search()
        details = maps.map(1)
        assert details["map"]["id"] == 1 and details["neighbours"]
    with pytest.raises(FileNotFoundError):
        Collection(tmp_path / "missing.db")


def test_python_search_needs_no_datasette_object(collection):
    """The service runs without a Datasette instance anywhere in the process."""
    code = textwrap.dedent(f"""
        import gc
        from datasette_mapclip.search.local import Collection
        with Collection({str(collection[0])!r}, settings={{"index": "off"}}) as maps:
            found = maps.search("relief map", k=3)["results"]
        from datasette.app import Datasette
        print(len(found), sum(isinstance(o, Datasette) for o in gc.get_objects()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "0"]


async def test_the_search_command_prints_what_search_json_answers(collection, tmp_path):
    import json

    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    picture = tmp_path / "query.png"
    draw_map(3).save(picture)
    cases = [
        (["relief map", "-k", "5"], {"q": "relief map", "k": 5}),
        (["--like", "3", "-k", "4", "--year-min", "1800"], {"like": 3, "k": 4, "year_min": 1800}),
        (["--term", "river", "--term", "map:4", "--term-weight", "1", "--term-weight", "-0.5", "--more", "1", "-k", "5"],
         {"term": ["river", "map:4"], "term_weight": ["1", "-0.5"], "more": [1], "k": 5}),
    ]
    runner = CliRunner()
    for args, search in cases:
        printed = runner.invoke(cli, ["search", str(collection[0]), *args, "--json"])
        assert printed.exit_code == 0, printed.output
        here = json.loads(printed.stdout)
        served = (await ds.client.get("/-/mapclip/search.json?" + urllib.parse.urlencode(search, doseq=True))).json()
        assert [(r["id"], r["similarity"]) for r in here["results"]] == \
               [(r["id"], r["similarity"]) for r in served["results"]], args
        assert here["sql"] == served["sql"]
    table = runner.invoke(cli, ["search", str(collection[0]), "relief map", "-k", "3"])
    assert table.exit_code == 0 and len(table.stdout.strip().splitlines()) == 3
    with_image = runner.invoke(cli, ["search", str(collection[0]), "--image", str(picture), "-k", "2", "--csv"])
    assert with_image.exit_code == 0 and with_image.stdout.splitlines()[0].startswith("id,similarity,title")
    for args, message in ((["x", "--weight", "5"], "weight must be between"),
                          (["--term", "image:/no/such.png"], "no such image file"),
                          (["x", "--model", "nope"], "nope"),
                          ([], "give q")):
        failed = runner.invoke(cli, ["search", str(collection[0]), *args])
        assert failed.exit_code == 1 and message in failed.output and "Traceback" not in failed.output, failed.output
