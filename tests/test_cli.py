import sqlite3

import click
import numpy as np
import pytest

from conftest import make_folder
from datasette_mapclip.cli import cli


def test_help_lists_every_command(invoke):
    out = invoke(["--help"]).output
    for command in ("load", "import-beto", "loc-metadata", "info", "export-vectors", "search", "encoders"):
        assert command in out
    load_help = invoke(["load", "--help"]).output
    for command in ("folder", "csv", "loc"):
        assert command in load_help


@pytest.mark.parametrize("args", [["load", "folder"], ["load", "csv"], ["load", "loc"], ["import-beto"],
                                  ["loc-metadata"], ["info"], ["export-vectors"], ["search"], ["encoders", "add"],
                                  ["encoders", "remove"]])
def test_every_command_documents_its_options(invoke, args):
    out = invoke([*args, "--help"]).output
    assert "DB_PATH" in out
    command = cli
    for name in args:
        command = command.get_command(None, name)
    for param in command.params:
        if getattr(param, "help", None) is None and param.param_type_name == "option" and param.name != "help":
            pytest.fail(f"{' '.join(args)} --{param.name} has no help text")


def test_info_and_export_vectors(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 4)
    invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    before = (tmp_path / "m.db").read_bytes()
    info = invoke(["info", tmp_path / "m.db"]).output
    assert "4 maps in" in info and "mapclip-tiny/sha256:" in info and "4 vectors of 64 floats" in info
    assert "query encoders: " in info and "text " in info and "tokenizer " in info and " MB" in info
    invoke(["export-vectors", tmp_path / "m.db", tmp_path / "v.npz"])
    assert (tmp_path / "m.db").read_bytes() == before  # both read the file only
    data = np.load(tmp_path / "v.npz")
    assert data["embedding"].shape == (4, 64) and data["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(data["embedding"], axis=1), 1, atol=1e-5)
    assert sorted(data["map_id"].tolist()) == [1, 2, 3, 4]


def test_every_command_that_embeds_takes_the_same_encoding_options():
    """Declared once (loaders/cli.py): the loads and `fine-tune register` take the same --device,
    --precision, --threads, --batch-size, --workers and engine options, with the same defaults."""
    import click

    from datasette_mapclip.cli import cli

    def options(*path):
        command, context = cli, click.Context(cli)
        for name in path:
            command = command.get_command(context, name)
        return {param.name: (param.type.name, param.default, param.help) for param in command.params
                if param.name in ("device", "precision", "threads", "batch_size", "workers", "quiet", "engine",
                                  "ray_address", "actors")}

    embedding = [("load", "folder"), ("load", "csv"), ("load", "loc"), ("fine-tune", "register")]
    reference = options(*embedding[0])
    assert len(reference) == 9
    for path in embedding[1:]:
        assert options(*path) == reference, path


@pytest.mark.parametrize("command", ["info", "export-vectors", "search", "encoders add", "encoders remove"])
def test_commands_leave_a_file_that_is_not_a_collection_alone(tmp_path, invoke, command):
    """Another program's SQLite file, a CSV: a one-line error, no traceback, the file unchanged (no
    schema, no journal mode switched)."""
    import sqlite3

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE levels (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    text = tmp_path / "f.csv"
    text.write_text("file,title\na.jpg,A map\n")
    extra = {"export-vectors": [tmp_path / "out.npz"], "search": ["map"]}.get(command, [])
    for path in (other, text):
        before = path.read_bytes()
        result = invoke([*command.split(), path, *extra], expect=1)
        assert "Traceback" not in result.output and "Error:" in result.output, result.output
        assert any(why in result.output for why in ("not a mapclip collection", "not a readable SQLite",
                                                     "cannot be opened as SQLite")), result.output
        assert path.read_bytes() == before and not (tmp_path / (path.name + "-wal")).exists()


def test_bad_load_arguments_are_refused_before_any_work(tmp_path, invoke, model_args, loc_server):
    """A negative --limit, a URL that is not a loc.gov search: one line, no traceback, before the model
    loads and before the database file is made."""
    file_list = tmp_path / "files.csv"
    file_list.write_text("file_url,resource_url,segment_num,p1_item_id,file_count\n")
    for args in (["load", "csv", tmp_path / "a.db", file_list, "--limit", "-3"],
                 ["load", "loc", tmp_path / "a.db", "https://www.loc.gov/maps/", "--limit", "-1"],
                 ["load", "loc", tmp_path / "a.db", "https://www.loc.gov/maps/", "--timeout", "0"]):
        result = invoke([*args, *model_args], expect=2)
        assert "Traceback" not in result.output and "Invalid value" in result.output, result.output
    server = loc_server()
    for url, why in ((f"{server.url}/no/such/page/", "search page failed"),
                     ("ftp://www.loc.gov/maps/", "not an http(s) URL")):
        result = invoke(["load", "loc", tmp_path / "b.db", url, *model_args], expect=1)
        assert why in result.output and "Traceback" not in result.output, result.output
        assert "model mapclip-tiny" not in result.output  # refused before the model loaded
        assert not (tmp_path / "b.db").exists()


def every_command(group=cli, path=()):
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name), command


def test_each_option_name_means_one_thing_in_every_command():
    """--workers: what reads and decodes images; --batch-size: what one model call (or training
    step) takes.  Other meanings have their own names (--pages-in-flight, --rows-per-commit)."""
    seen = {"--workers": [], "--batch-size": []}
    for path, command in every_command():
        for param in command.params:
            for name in set(getattr(param, "opts", ())) & set(seen):
                if not param.hidden:
                    seen[name].append((" ".join(path), param.help or ""))
    assert len(seen["--workers"]) >= 4 and len(seen["--batch-size"]) >= 4, seen
    for where, text in seen["--workers"]:
        assert "decoding images" in text or "reading" in text and "images" in text, (where, text)
    for where, text in seen["--batch-size"]:
        assert "per model call" in text or "per step" in text, (where, text)


def test_the_old_option_names_still_work_and_say_the_new_one(invoke, tmp_path):
    # (stopped by a bad --dates right after the note: nothing is fetched or written)
    db = tmp_path / "m.db"
    db.write_bytes(b"")
    out = invoke(["loc-metadata", db, "--workers", "2", "--dates", "not-a-year"], expect=2)
    assert "--workers is now --pages-in-flight" in out.output and db.read_bytes() == b""


def test_publish_copy_leaves_no_machine_details_and_searches_the_same(invoke, tmp_path, tmp_path_factory, model_args):
    from conftest import load_collection
    from datasette_mapclip.search.local import Collection

    db_path, folder = load_collection(tmp_path_factory, model_args, 6)
    before = db_path.read_bytes()
    assert str(folder.resolve()).encode() in before  # the loaded file names its folder
    out = tmp_path / "public.db"
    result = invoke(["publish-copy", db_path, out])
    assert "a copy to publish" in result.output
    assert db_path.read_bytes() == before  # the collection itself is only read
    published = out.read_bytes()
    for private in (str(folder.resolve()), str(tmp_path_factory.getbasetemp())):
        assert private.encode() not in published, private
    with sqlite3.connect(out) as conn:
        locations = {row[0] for row in conn.execute("SELECT location FROM maps")}
        assert locations and locations <= {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert conn.execute("SELECT count(*) FROM loads WHERE host IS NOT NULL OR pid IS NOT NULL").fetchone()[0] == 0
    original, copy = Collection(db_path), Collection(out)
    try:
        for args in ({"like": 2, "k": 4}, {"q": "relief map", "k": 4}):
            assert [r["id"] for r in copy.search(**args)["results"]] == [r["id"] for r in original.search(**args)["results"]]
    finally:
        original.close()
        copy.close()
    # an existing OUTPUT is never overwritten; a file that is not a collection is refused
    again = invoke(["publish-copy", db_path, out], expect=1)
    assert "exists" in again.output and out.read_bytes() == published
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    refused = invoke(["publish-copy", other, tmp_path / "x.db"], expect=1)
    assert "not a mapclip collection" in refused.output and not (tmp_path / "x.db").exists()
