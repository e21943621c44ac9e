"""Loads always finish: odd file names, bad catalogue values, odd CSV encodings, symbolic links,
multi-page TIFFs, unsafe links and duplicates each become a stored map, a note or a load error,
never a traceback, and never cost the rest of the collection."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

from conftest import draw_map, make_folder, open_db
from datasette_mapclip.store import MapStore
from datasette_mapclip.store.records import MapRecord


def maps_by_source(db_path) -> dict:
    return {r["source_id"]: dict(r) for r in open_db(db_path).execute("SELECT * FROM maps")}


def load_errors(db_path) -> dict:
    return {r["source_id"]: dict(r) for r in open_db(db_path).execute("SELECT * FROM load_errors")}


def write_metadata(path, rows, *, encoding="utf-8"):
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(out.getvalue().encode(encoding))


# -- 1. file names that are not UTF-8 -------------------------------------------------------

def test_a_file_name_that_is_not_utf8_loads_with_a_stable_displayable_id(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    odd = os.path.join(os.fsencode(folder), b"map_\xff.jpg")
    draw_map(7).save(os.fsdecode(odd), "JPEG")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "3 loaded, 0 skipped (already stored), 0 failed" in out.output
    maps = maps_by_source(tmp_path / "m.db")
    assert "map_\\xff.jpg" in maps  # shown with a backslash escape, not dropped, not mangled
    assert maps["map_\\xff.jpg"]["title"] == "map \\xff"
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "0 loaded, 3 skipped (already stored), 0 failed" in out.output  # the id is stable
    assert len(maps_by_source(tmp_path / "m.db")) == 3


# -- 2. catalogue numbers that do not fit ---------------------------------------------------

def test_bad_years_and_sheets_are_noted_and_never_sink_the_load(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 4, metadata=False)
    write_metadata(folder / "metadata.csv", [
        {"file": "sheet_0001.jpg", "year": str(10**20), "sheet": "2", "date": "1850"},
        {"file": "sheet_0002.jpg", "year": "²", "sheet": str(10**20), "date": ""},
        {"file": "sheet_0003.jpg", "year": "١٨٥٠", "sheet": "²", "date": ""},  # Arabic-Indic digits: 1850
    ])
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "4 loaded, 0 skipped (already stored), 0 failed, 3 notes" in out.output
    assert "sheet_0002.jpg [metadata]: metadata.csv line 3: sheet '100000000000000000000' is out of range" in out.output
    assert "year '²' is not a number (a whole number is expected): ignored" in out.output
    maps = maps_by_source(tmp_path / "m.db")
    assert (maps["sheet_0001.jpg"]["year"], maps["sheet_0001.jpg"]["sheet"]) == (1850, 2)  # year from the date
    assert (maps["sheet_0002.jpg"]["year"], maps["sheet_0002.jpg"]["sheet"]) == (None, None)
    assert (maps["sheet_0003.jpg"]["year"], maps["sheet_0003.jpg"]["sheet"]) == (1850, None)
    notes = load_errors(tmp_path / "m.db")
    assert set(notes) == {"sheet_0001.jpg [metadata]", "sheet_0002.jpg [metadata]", "sheet_0003.jpg [metadata]"}
    assert notes["sheet_0001.jpg [metadata]"]["stage"] == "metadata"
    assert "out of range" in notes["sheet_0001.jpg [metadata]"]["reason"]
    assert "year '²' is not a number" in notes["sheet_0002.jpg [metadata]"]["reason"]
    assert "sheet '100000000000000000000' is out of range" in notes["sheet_0002.jpg [metadata]"]["reason"]


def test_a_record_sqlite_refuses_becomes_a_load_error_and_its_batch_still_loads(tmp_path, tiny_encoder):
    from loaders.pipeline import run_load

    paths = []
    for i in range(4):
        draw_map(i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    records = [MapRecord(source_id=f"m{i}", location=p, source="test") for i, p in enumerate(paths)]
    records[1].year = 10**20  # another source's value past SQLite's 64-bit INTEGER
    store = MapStore(tmp_path / "m.db")
    summary = run_load(store, tiny_encoder, records, batch_size=8, workers=1, progress=False)
    assert (summary.status, summary.loaded, summary.failed) == ("finished", 3, 1)
    assert set(maps_by_source(tmp_path / "m.db")) == {"m0", "m2", "m3"}
    error = load_errors(tmp_path / "m.db")["m1"]
    assert error["stage"] == "store" and "OverflowError" in error["reason"]
    assert "m1 (store): cannot be stored" in summary.line()


# -- 3. metadata CSVs in other encodings, and over-long fields ------------------------------

@pytest.mark.parametrize("encoding,note", [
    ("utf-8", None), ("utf-8-sig", None), ("utf-16", None),  # Python's utf-16 writes a BOM
    ("cp1252", "metadata.csv is not UTF-8 (byte 30 is not): read it as Windows-1252"),
])
def test_metadata_csv_in_utf16_or_a_windows_encoding_is_read(tmp_path, invoke, model_args, encoding, note):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    write_metadata(folder / "metadata.csv", [{"file": "sheet_0001.jpg", "title": "Café de Paris – plan"}],
                   encoding=encoding)
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "Traceback" not in out.output
    assert maps_by_source(tmp_path / "m.db")["sheet_0001.jpg"]["title"] == "Café de Paris – plan"
    if note:
        assert note in out.output
    else:
        assert "not UTF-8" not in out.output


def test_latin1_bytes_cp1252_cannot_decode_fall_back_to_latin1(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 1, metadata=False)
    # 0x81 is a hole in Windows-1252; Latin-1 reads every byte
    (folder / "metadata.csv").write_bytes(b"file,title\r\natlas/sheet_0000.jpg,Caf\xe9 \x81\r\n")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "read it as Latin-1" in out.output and "Traceback" not in out.output
    assert maps_by_source(tmp_path / "m.db")["atlas/sheet_0000.jpg"]["title"] == "Café \x81"


TITLE_ESCAPE = "\x1b]0;pwned\x07"  # sets the terminal's title: must never reach the terminal as it is


def no_control_bytes(text: str):
    assert "\x1b" not in text and "\x07" not in text, repr(text)


def test_an_over_long_metadata_cell_is_a_load_error_and_the_rest_loads(tmp_path, invoke, model_args):
    """Issue 18 (9): one cell over Python csv's 131,072-character limit stopped the whole load."""
    folder = make_folder(tmp_path / "scans", 3, metadata=False)
    write_metadata(folder / "metadata.csv", [
        {"file": "sheet_0001.jpg", "title": "Too long", TITLE_ESCAPE: "x" * 200_000},
        {"file": "sheet_0002.jpg", "title": "Second sheet", TITLE_ESCAPE: ""},
    ])
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "3 loaded" in out.output and "1 notes" in out.output, out.output
    maps = maps_by_source(tmp_path / "m.db")
    assert maps["sheet_0002.jpg"]["title"] == "Second sheet"  # the rows after it still load
    assert maps["sheet_0001.jpg"]["title"] == "sheet 0001"  # its image too, without the row's fields
    error = load_errors(tmp_path / "m.db")["sheet_0001.jpg [metadata]"]
    assert error["stage"] == "metadata"
    assert "metadata.csv line 2: the '\\x1b]0;pwned\\x07' cell has 200,000 characters" in error["reason"]
    assert "more than the 131,072" in error["reason"]
    assert "x" * 100 not in error["reason"] and "x" * 100 not in out.output  # the cell itself is not quoted
    no_control_bytes(out.output)
    no_control_bytes(error["reason"])


def test_a_zero_byte_metadata_csv_is_no_metadata_with_a_warning(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    (folder / "metadata.csv").write_bytes(b"")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "2 loaded" in out.output, out.output
    warnings = [line for line in out.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "metadata.csv is empty" in warnings[0], out.output
    assert maps_by_source(tmp_path / "m.db")["sheet_0001.jpg"]["title"] == "sheet 0001"


def test_a_file_list_with_an_over_long_cell_loads_its_other_rows(tmp_path, invoke, model_args, loc_server):
    server = loc_server(items=2)
    good = f"{server.service(1)}/full/pct:100/0/default.jpg"
    path = tmp_path / "list.csv"
    path.write_bytes((f"file_url,p1_item_id\r\nhttps://x.org/iiif/a/full/pct:100/0/default.jpg,{'y' * 140_000}\r\n"
                      f"https://x.org/{TITLE_ESCAPE}.pdf#pct:,x\r\n"
                      f"{good},http://www.loc.gov/item/testmap0001/\r\n").encode("utf-16"))
    out = invoke(["load", "csv", tmp_path / "m.db", path, *model_args, "--rate", "0"])
    assert "1 loaded" in out.output and "2 failed" in out.output, out.output
    errors = load_errors(tmp_path / "m.db")
    reason = errors[f"{path}:line 2"]["reason"]
    assert "line 2: the 'p1_item_id' cell has 140,000 characters" in reason
    bad_url = next(e["reason"] for e in errors.values() if "not a IIIF image URL" in e["reason"])
    assert "\\x1b]0;pwned\\x07" in bad_url
    no_control_bytes(out.output)
    no_control_bytes(bad_url)


# -- 4. symbolic links ----------------------------------------------------------------------

def test_symlinks_leaving_the_folder_are_skipped_and_reported_unless_asked_for(tmp_path, invoke, model_args):
    outside = make_folder(tmp_path / "private", 2, metadata=False)
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    (folder / "secret.jpg").symlink_to(outside / "sheet_0001.jpg")
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)
    (folder / "same.jpg").symlink_to(folder / "sheet_0001.jpg")  # inside: fine
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # inside: walked once, as itself
    (folder / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "skipped 3 symbolic links" in out.output
    assert "secret.jpg (symbolic link leading outside the folder" in out.output
    assert set(maps_by_source(tmp_path / "m.db")) == {"atlas/sheet_0000.jpg", "sheet_0001.jpg", "same.jpg"}
    errors = load_errors(tmp_path / "m.db")
    assert {k: v["stage"] for k, v in errors.items()} == {"secret.jpg": "source", "elsewhere": "source",
                                                          "broken.jpg": "source"}
    assert str(outside) not in " ".join(v["reason"] for v in errors.values())  # the target is not published

    out = invoke(["load", "folder", tmp_path / "m.db", folder, "--follow-symlinks", *model_args])
    assert set(maps_by_source(tmp_path / "m.db")) == {
        "atlas/sheet_0000.jpg", "sheet_0001.jpg", "same.jpg", "secret.jpg",
        "elsewhere/atlas/sheet_0000.jpg", "elsewhere/sheet_0001.jpg"}
    assert set(load_errors(tmp_path / "m.db")) == {"broken.jpg"}  # loading a link clears its note


def test_follow_symlinks_is_documented(invoke):
    assert "--follow-symlinks" in invoke(["load", "folder", "--help"]).output


# -- 7. multi-page TIFFs --------------------------------------------------------------------

def test_a_multi_page_tiff_embeds_its_first_page_and_says_so(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 1, metadata=False)
    pages = [draw_map(20), draw_map(21), draw_map(22)]
    pages[0].save(folder / "volume.tif", save_all=True, append_images=pages[1:])
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "2 loaded, 0 skipped (already stored), 0 failed, 1 notes" in out.output
    assert "volume.tif [pages]: 3 pages in the file; only the first was embedded" in out.output
    assert "volume.tif" in maps_by_source(tmp_path / "m.db")
    note = load_errors(tmp_path / "m.db")["volume.tif [pages]"]
    assert note["stage"] == "pages" and note["reason"] == "3 pages in the file; only the first was embedded"


# -- 9. unsafe links --------------------------------------------------------------------------

def test_unsafe_links_in_metadata_are_reported_without_quoting_them(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    write_metadata(folder / "metadata.csv", [
        {"file": "sheet_0001.jpg", "item_url": "javascript:alert(1)",
         "image_url": "data:text/html,<script>alert(1)</script>"},
    ])
    out = invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    assert "0 failed, 1 notes" in out.output and "sheet_0001.jpg [links]: item_url is not" in out.output
    note = load_errors(tmp_path / "m.db")["sheet_0001.jpg [links]"]
    assert note["stage"] == "links" and note["reason"] == (
        "item_url is not an http(s) link (scheme 'javascript'): kept, but never shown as a link; "
        "image_url is not an http(s) link (scheme 'data'): kept, but never shown as a link")
    assert "alert" not in note["reason"]


def test_unsafe_links_in_a_file_list_are_reported(tmp_path, invoke, model_args, loc_server):
    server = loc_server()
    path = tmp_path / "list.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_url", "resource_url", "segment_num", "p1_item_id", "file_count"])
        writer.writerow([f"{server.service(1)}/full/pct:100/0/default.jpg", "r1", "0", "javascript:alert(1)", "1"])
    out = invoke(["load", "csv", tmp_path / "m.db", path, "--rate", "0", *model_args])
    assert "1 loaded" in out.output and "1 notes" in out.output
    (note,) = load_errors(tmp_path / "m.db").values()
    assert note["stage"] == "links" and "item_url is not an http(s) link (scheme 'javascript')" in note["reason"]


# -- 10. duplicates within one run --------------------------------------------------------------

def test_the_same_file_listed_twice_is_one_map(tmp_path, invoke, model_args, loc_server):
    server = loc_server()
    path = tmp_path / "list.csv"
    image = f"{server.service(1)}/full/pct:100/0/default.jpg"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_url", "resource_url", "segment_num", "p1_item_id", "file_count"])
        writer.writerow([image, "r1", "0", "https://www.loc.gov/item/testmap0001/", "1"])
        writer.writerow([image, "r1", "0", "https://www.loc.gov/item/testmap0001/", "1"])
        writer.writerow([image.replace("pct:100", "pct:25"), "r1", "0", "https://www.loc.gov/item/testmap0001/", "1"])
    out = invoke(["load", "csv", tmp_path / "m.db", path, "--rate", "0", *model_args])
    assert "1 loaded, 2 skipped" in out.output
    out = invoke(["load", "csv", tmp_path / "m.db", path, "--rate", "0", *model_args])
    assert "0 loaded, 3 skipped" in out.output
    assert len(maps_by_source(tmp_path / "m.db")) == 1


def test_the_same_file_twice_in_metadata_is_one_map(tmp_path, invoke, model_args):
    folder = make_folder(tmp_path / "scans", 2, metadata=False)
    write_metadata(folder / "metadata.csv", [{"file": "sheet_0001.jpg", "title": "First"},
                                             {"file": "sheet_0001.jpg", "title": "Second"}])
    invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    invoke(["load", "folder", tmp_path / "m.db", folder, *model_args])
    maps = maps_by_source(tmp_path / "m.db")
    assert len(maps) == 2 and maps["sheet_0001.jpg"]["title"] == "Second"  # the last row wins


def test_the_same_source_id_twice_in_one_batch_is_one_row(tmp_path):
    store = MapStore(tmp_path / "m.db")
    model = store.register_model({"name": "test/unit", "architecture": "test", "dim": 4})
    twice = [MapRecord(source_id="s1", location="/a.jpg", source="test", title="A"),
             MapRecord(source_id="s1", location="/a.jpg", source="test", title="B")]
    store.write_batch(model, twice, np.eye(4, dtype=np.float32)[:2])
    assert store.conn.execute("SELECT count(*), max(title) FROM maps").fetchone()[:] == (1, "B")
    assert store.vector_count(model) == 1



def test_beto_file_lists_in_utf16_with_odd_segments_give_no_sheet_not_a_crash(tmp_path):
    from loaders.sources.beto import beto_records, files_lookup

    image = "https://tile.loc.gov/image-services/iiif/service:gmd:x:{}/full/pct:100/0/default.jpg"
    rows = "file_url,segment_num,p1_item_id\r\n" + "".join(
        f"{image.format(n)},{segment},https://www.loc.gov/item/x{n}/\r\n"
        for n, segment in enumerate(["0", "²", str(10**20), "4"]))
    (tmp_path / "files.csv").write_bytes(rows.encode("utf-16"))
    records = beto_records([image.format(n) for n in range(4)], files_lookup(str(tmp_path / "files.csv")))
    assert [r.sheet for r in records] == [1, None, None, 5]
