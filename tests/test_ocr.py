"""Reading the words printed on maps (issue 22, "Read" and "Store"): the real RapidOCR models on
sheets drawn here with known words, a real collection file loaded with the tiny model, `mapclip ocr`
run as users run it.  No stand-in recogniser, no network (the loc.gov stand-in is local)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import open_db

pytest.importorskip("rapidocr")

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
SHEET = (960, 640)
# --tile 512 --overlap 192 on a 960 x 640 sheet: columns [0, 449], [256, 705], [511, 960],
# rows [0, 417], [223, 640] (loaders.ocr.tile_starts)
TILES = ["--tile", "512", "--overlap", "192"]


def font(size: int):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size=size)


def paper(size) -> Image.Image:
    image = Image.new("RGB", size, (236, 228, 205))
    draw = ImageDraw.Draw(image)
    for x in range(0, size[0], 160):  # a graticule and a river: lines are not words
        draw.line([(x, 0), (x, size[1])], fill=(160, 160, 180), width=1)
    draw.line([(0, size[1] - 40), (size[0] // 2, size[1] - 90), (size[0], size[1] - 60)], fill=(60, 90, 170), width=3)
    return image


def put(image: Image.Image, text: str, xy, angle: int = 0, size: int = 30) -> tuple[float, float, float, float]:
    """Draw ``text`` with its top left at ``xy``, turned ``angle`` degrees counter-clockwise;
    returns its ink box normalised to the sheet (x, y, w, h)."""
    face = font(size)
    left, top, right, bottom = face.getbbox(text)
    ink = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(ink).text((2 - left, 2 - top), text, font=face, fill=(25, 25, 25, 255))
    ink = ink.rotate(angle, expand=True)
    image.paste(ink, xy, ink)
    width, height = image.size
    return xy[0] / width, xy[1] / height, ink.width / width, ink.height / height


def huge_png(path: Path, width: int = 30_000, height: int = 30_000):
    """A valid 1-bit PNG of width x height (900 Mpx), written without holding it in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def sheets(tmp_path_factory):
    """A folder: a sheet of words (with where each was drawn), a sheet with no text, and two
    maps whose files will be replaced after loading (damaged, 30,000 px)."""
    folder = tmp_path_factory.mktemp("ocr") / "maps"
    folder.mkdir()
    sheet = paper(SHEET)
    truth = {
        "Hagerstown": put(sheet, "Hagerstown", (40, 60)),
        # vertical, read bottom to top; cut by the second row's top edge (y=223), whole in the first row
        "Annapolis": put(sheet, "Annapolis", (870, 190), angle=90),
        # straddles the column edges at x=449 and x=511: whole only in the middle column
        "Cumberland": put(sheet, "Cumberland", (372, 470)),
    }
    sheet.save(folder / "words.png")
    paper((480, 360)).save(folder / "blank.png")
    for name in ("damaged", "huge"):
        paper((320, 240)).save(folder / f"{name}.png")
    return folder, truth


@pytest.fixture(scope="module")
def collection(sheets, model_args):
    """The folder loaded with the tiny model; then the two maps' files are damaged and enlarged,
    and `mapclip ocr` runs once (the run the tests look at)."""
    from click.testing import CliRunner

    from datasette_mapclip.cli import cli

    folder, truth = sheets
    db_path = folder.parent / "maps.db"
    result = CliRunner().invoke(cli, ["load", "folder", str(db_path), str(folder), *model_args])
    assert result.exit_code == 0, result.output
    good = (folder / "blank.png").read_bytes()
    (folder / "damaged.png").write_bytes(good[: len(good) // 3])  # a truncated PNG
    huge_png(folder / "huge.png")
    result = CliRunner().invoke(cli, ["ocr", str(db_path), *TILES, "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return db_path, truth, result.output


def map_id(conn, name: str) -> int:
    return conn.execute("SELECT id FROM maps WHERE source_id = ?", (name,)).fetchone()[0]


def words_of(conn, name: str) -> list[dict]:
    from datasette_mapclip.store import read_map_words

    return read_map_words(conn, map_id(conn, name))


def overlapping(words: list[dict], box) -> list[dict]:
    x, y, w, h = box
    return [word for word in words if word["x"] < x + w and x < word["x"] + word["w"]
            and word["y"] < y + h and y < word["y"] + word["h"]]


def copy_db(db_path: Path, tmp_path: Path) -> Path:
    """A copy beside the original: its maps' locations are relative to the collection's folder."""
    target = db_path.parent / f"copy-{tmp_path.name}.db"
    shutil.copy(db_path, target)
    return target


# -- reading ---------------------------------------------------------------------------------

def test_words_land_in_map_words_where_they_were_drawn(collection):
    db_path, truth, output = collection
    conn = open_db(db_path)
    words = words_of(conn, "words.png")
    texts = [word["text"] for word in words]
    for name in ("Hagerstown", "Annapolis"):
        assert texts.count(name) == 1, texts
        word = next(w for w in words if w["text"] == name)
        x, y, w, h = truth[name]
        # the box is normalised to the sheet and lies on the ink: its centre within 2 % of the sheet of the
        # ink's, each side from the ink's to twice it (the detector grows a box around the letters: seen
        # in 512 px tiles, "Annapolis" is 33 px of ink across and its box 62)
        for start, size, ink_start, ink_size in ((word["x"], word["w"], x, w), (word["y"], word["h"], y, h)):
            assert abs((start + size / 2) - (ink_start + ink_size / 2)) < 0.02, (name, word, truth[name])
            assert ink_size <= size <= 2 * ink_size, (name, word, truth[name])
        assert word["confidence"] > 0.8
    angles = {word["text"]: word["angle"] for word in words}
    assert abs(angles["Hagerstown"]) < 5
    assert abs(angles["Annapolis"] - 90) < 5  # read bottom to top, as drawn
    provenance = conn.execute("SELECT engine, engine_version, weights, settings FROM ocr_models").fetchall()
    assert len(provenance) == 1 and provenance[0][0] == "rapidocr"
    assert "PP-OCRv6_rec_small.onnx" in provenance[0][2] and '"tile": 512' in provenance[0][3]
    assert "read 2 maps" in output and "2 failed" in output


def test_a_word_cut_by_tile_edges_is_read_once(collection):
    db_path, truth, _ = collection
    words = words_of(open_db(db_path), "words.png")
    for name in ("Cumberland", "Annapolis"):
        found = overlapping(words, truth[name])
        assert [word["text"] for word in found] == [name], words


def test_tiles_stay_under_the_cap_and_overlap():
    from loaders.ocr import tile_starts, tiles_of

    for length in (100, 512, 513, 960, 2048, 3000, 30_000):
        spans = tile_starts(length, 512, 192)
        assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length
        assert all(size <= 512 for _, size in spans)
        assert all(a + size - b >= 192 for (a, size), (b, _) in zip(spans, spans[1:]))
    assert len(tiles_of(960, 640, 512, 192)) == 6


def test_a_map_with_no_text_is_marked_read(collection):
    db_path, _, _ = collection
    conn = open_db(db_path)
    blank = map_id(conn, "blank.png")
    mark = conn.execute("SELECT word_count, width, height FROM map_words_read WHERE map_id = ?", (blank,)).fetchone()
    assert tuple(mark) == (0, 480, 360)
    assert conn.execute("SELECT count(*) FROM map_words WHERE map_id = ?", (blank,)).fetchone()[0] == 0


def test_damaged_and_oversized_images_are_load_errors_and_the_rest_is_read(collection):
    db_path, _, _ = collection
    conn = open_db(db_path)
    errors = {row[0]: (row[1], row[2]) for row in conn.execute(
        "SELECT source_id, stage, reason FROM load_errors WHERE stage = 'ocr'")}
    assert set(errors) == {"damaged.png [ocr]", "huge.png [ocr]"}
    assert "decode" in errors["damaged.png [ocr]"][1]
    assert "too many pixels" in errors["huge.png [ocr]"][1]
    read = {row[0] for row in conn.execute(
        "SELECT maps.source_id FROM map_words_read JOIN maps ON maps.id = map_words_read.map_id")}
    assert read == {"words.png", "blank.png"}


def test_a_rerun_reads_nothing_already_read(collection, tmp_path, monkeypatch, invoke):
    from loaders.ocr import OcrEngine

    db_path = copy_db(collection[0], tmp_path)
    before = open_db(db_path).execute("SELECT count(*), max(id) FROM map_words").fetchone()
    calls = []
    real_read = OcrEngine.read
    monkeypatch.setattr(OcrEngine, "read", lambda self, image: calls.append(image.size) or real_read(self, image))
    out = invoke(["ocr", db_path, *TILES, "--quiet"])
    assert "2 maps to read, 2 already read" in out.output  # the two failures are tried again
    assert calls == []  # neither decodes, and nothing read before is read again
    conn = open_db(db_path)
    assert tuple(conn.execute("SELECT count(*), max(id) FROM map_words").fetchone()) == tuple(before)
    assert conn.execute("SELECT attempts FROM load_errors WHERE source_id = 'huge.png [ocr]'").fetchone()[0] == 2
    # other reading settings are another OCR model: the maps are read again, their words replaced
    out = invoke(["ocr", db_path, "--quiet"])
    assert "4 maps to read, 0 already read" in out.output
    assert len(calls) == 2, out.output
    texts = sorted(w["text"] for w in words_of(conn, "words.png"))
    # (read whole, the sheet is one tile, and there the detector's box around the vertical name stops short
    # of its last letter: "Annapoli"; --detect-scale 1.5, below, reads it whole)
    assert len(texts) == 3 and texts[0].startswith("Annapoli") and texts[1:] == ["Cumberland", "Hagerstown"]
    assert conn.execute("SELECT count(DISTINCT ocr_model) FROM map_words_read").fetchone()[0] == 1
    # --detect-scale is one of those settings, recorded with the reading
    out = invoke(["ocr", db_path, "--detect-scale", "1.5", "--quiet"])
    assert "4 maps to read, 0 already read" in out.output
    settings = json.loads(conn.execute("SELECT settings FROM ocr_models WHERE id = "
                                       "(SELECT DISTINCT ocr_model FROM map_words_read)").fetchone()[0])
    assert settings["detect_scale"] == 1.5
    # the words replaced, once each
    assert sorted(w["text"] for w in words_of(conn, "words.png")) == ["Annapolis", "Cumberland", "Hagerstown"]
    assert conn.execute("SELECT count(DISTINCT ocr_model) FROM map_words").fetchone()[0] == 1


# -- storing -----------------------------------------------------------------------------------

def test_words_and_mark_are_written_in_one_transaction(collection, tmp_path):
    from datasette_mapclip.store import MapStore, MapWord, WordStore

    db_path = copy_db(collection[0], tmp_path)
    store = MapStore(db_path)
    words = WordStore(store)
    target = map_id(store.conn, "words.png")
    before = store.conn.execute("SELECT id, text FROM map_words WHERE map_id = ? ORDER BY id", (target,)).fetchall()
    mark = store.conn.execute("SELECT * FROM map_words_read WHERE map_id = ?", (target,)).fetchone()
    model = store.conn.execute("SELECT ocr_model FROM map_words_read WHERE map_id = ?", (target,)).fetchone()[0]
    # a failure after the words are inserted: the mark's insert fails
    store.conn.execute("CREATE TRIGGER fail_mark BEFORE INSERT ON map_words_read "
                       "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    new = [MapWord("Frederick", 0.9, 0.1, 0.1, 0.2, 0.05), MapWord("Emmitsburg", 0.9, 0.4, 0.4, 0.2, 0.05)]
    with pytest.raises(Exception, match="injected failure"):
        words.write_reading(target, model, new)
    after = store.conn.execute("SELECT id, text FROM map_words WHERE map_id = ? ORDER BY id", (target,)).fetchall()
    assert [tuple(r) for r in after] == [tuple(r) for r in before]  # the old reading, whole
    assert tuple(store.conn.execute("SELECT * FROM map_words_read WHERE map_id = ?", (target,)).fetchone()) == tuple(mark)
    assert store.conn.execute("SELECT count(*) FROM map_words WHERE text IN ('Frederick', 'Emmitsburg')").fetchone()[0] == 0
    store.conn.execute("DROP TRIGGER fail_mark")
    assert words.write_reading(target, model, new) == 2
    assert [w["text"] for w in words_of(store.conn, "words.png")] == ["Frederick", "Emmitsburg"]
    store.close()


def test_full_text_search_folds_case_and_accents_and_takes_any_user_text(collection, tmp_path):
    from datasette_mapclip.store import MapStore, MapWord, WordStore, read_maps_matching_words, words_fts_query

    db_path = copy_db(collection[0], tmp_path)
    store = MapStore(db_path)
    conn = store.conn
    sheet, blank = map_id(conn, "words.png"), map_id(conn, "blank.png")
    # words read by OCR, found whatever the case or accents of the query
    for query in ("hagerstown", "HAGERSTOWN", "Hágerstówn", "annapolis hagerstown"):
        assert [m["map_id"] for m in read_maps_matching_words(conn, query)] == [sheet], query
    assert read_maps_matching_words(conn, "hagerstown frederick") == []  # every term must be on the map
    # accents stored (a reading of a French map) found without them
    model = conn.execute("SELECT id FROM ocr_models").fetchone()[0]
    WordStore(store).write_reading(blank, model, [MapWord("Québec", 0.9, 0.1, 0.1, 0.2, 0.1),
                                                  MapWord("SmithIsland", 0.9, 0.5, 0.5, 0.3, 0.1)])
    found = read_maps_matching_words(conn, "QUEBEC")
    assert found == [{"map_id": blank, "words": ["Québec"]}]
    # a space OCR dropped inside a two-word name
    assert [m["map_id"] for m in read_maps_matching_words(conn, "Smith Island")] == [blank]
    # user text is never FTS5 syntax
    for query in ['"', 'NEAR(', "AND", "OR OR", "*", "text:Québec", "') OR 1=1 --", "^Q", "-", "a\x00b", "((",
                  "Hagerstown\"", "NOT hagerstown", "", "   ", "🗺️", "x" * 5000]:
        read_maps_matching_words(conn, query)
        fts = words_fts_query(query)
        if fts:
            conn.execute("SELECT count(*) FROM map_words_fts WHERE map_words_fts MATCH ?", (fts,)).fetchone()
    assert [m["map_id"] for m in read_maps_matching_words(conn, 'hagerstown"')] == [sheet]
    store.close()


# -- the command -------------------------------------------------------------------------------

def test_clear_messages_for_a_missing_file_a_plain_database_and_no_ocr_engine(tmp_path, collection, invoke,
                                                                              monkeypatch):
    import sqlite3

    out = invoke(["ocr", tmp_path / "nothing.db"], expect=1)
    assert "no database at" in out.output and "Traceback" not in out.output
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("create table notes (id integer primary key)").connection.commit()
    out = invoke(["ocr", plain], expect=1)
    assert "is not a mapclip collection" in out.output
    assert "map_words" not in {r[0] for r in sqlite3.connect(plain).execute("select name from sqlite_master")}
    monkeypatch.setitem(__import__("sys").modules, "rapidocr", None)  # not installed
    out = invoke(["ocr", collection[0]], expect=1)
    assert "pip install 'rapidocr" in out.output and "Traceback" not in out.output


def test_damaged_or_missing_ocr_models_are_a_clear_message_and_nothing_is_fetched(tmp_path, collection, invoke,
                                                                                 monkeypatch):
    """The models are opened from the installed files by name: a damaged one is a one-line message (RapidOCR,
    left to find its models, would try to download it again), a missing one too; no map is marked read."""
    import shutil

    import rapidocr
    import requests

    from loaders import ocr

    fetched = []

    def no_network(url, *args, **kwargs):
        fetched.append(url)
        raise requests.ConnectionError("no network in tests")

    monkeypatch.setattr(requests, "get", no_network)
    models = tmp_path / "models"
    shutil.copytree(ocr.model_folder(rapidocr), models)
    recogniser = models / ocr.MODEL_FILES["Rec"]
    recogniser.write_bytes(recogniser.read_bytes()[:4096])  # cut short
    monkeypatch.setattr(ocr, "model_folder", lambda module: models)
    conn = open_db(collection[0])
    marks = conn.execute("SELECT count(*) FROM map_words_read").fetchone()[0]
    out = invoke(["ocr", collection[0], "--tile", "1024"], expect=1)  # other settings: every map to read
    assert "the OCR models did not load" in out.output and "reinstall" in out.output, out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1, out.output
    recogniser.unlink()
    out = invoke(["ocr", collection[0], "--tile", "1024"], expect=1)
    assert "the OCR models are not installed" in out.output and ocr.MODEL_FILES["Rec"] in out.output
    assert conn.execute("SELECT count(*) FROM map_words_read").fetchone()[0] == marks
    assert fetched == []


def test_iiif_maps_are_read_at_the_ocr_size_and_kept_images_reused(loc_server, tmp_path, invoke, model_args):
    server = loc_server(items=2, per_page=4)
    db_path, keep = tmp_path / "loc.db", tmp_path / "kept"
    invoke(["load", "loc", db_path, f"{server.url}/collections/test-maps/", "--rate", "0", *model_args])
    before = len(server.requests)
    out = invoke(["ocr", db_path, "--ocr-size", "1024", "--rate", "0", "--keep-images", keep, "--quiet"])
    asked = [path for path in server.requests[before:] if path.startswith("/iiif/")]
    assert len(asked) == 2 and all(path.endswith("/full/!1024,1024/0/default.jpg") for path in asked), asked
    assert "read 2 maps" in out.output and "0 read from kept images, 2 newly kept" in out.output
    assert len(list((keep / "ocr-1024").rglob("*.jpg"))) == 2
    # other settings read the maps again, from the kept files
    before = len(server.requests)
    out = invoke(["ocr", db_path, "--ocr-size", "1024", "--overlap", "64", "--rate", "0", "--keep-images", keep,
                  "--quiet"])
    assert "read 2 maps" in out.output and "2 read from kept images" in out.output
    assert [p for p in server.requests[before:] if p.startswith("/iiif/")] == []


# -- --ocr on the loaders ----------------------------------------------------------------------

def test_a_load_with_ocr_reads_the_words_once_the_maps_are_embedded(tmp_path, model_args, invoke):
    """`load folder --ocr` embeds the maps, then reads their words with the same pass as `mapclip
    ocr` (its loads row, map_words, the read marks); a rerun reads nothing twice."""
    folder = tmp_path / "maps"
    folder.mkdir()
    sheet = paper(SHEET)
    put(sheet, "Frederick", (60, 80), size=34)
    put(sheet, "Chesapeake", (420, 380), size=34)
    sheet.save(folder / "lettered.png")
    paper((480, 360)).save(folder / "blank.png")
    db_path = tmp_path / "maps.db"
    out = invoke(["load", "folder", db_path, folder, *model_args, "--ocr", "--quiet"])
    assert "2 maps to read, 0 already read" in out.output
    conn = open_db(db_path)
    texts = sorted(w["text"] for w in words_of(conn, "lettered.png"))
    assert texts == ["Chesapeake", "Frederick"], texts
    assert words_of(conn, "blank.png") == []
    assert conn.execute("SELECT count(*) FROM map_words_read").fetchone()[0] == 2
    commands = [row[0] for row in conn.execute("SELECT command FROM loads ORDER BY id")]
    assert commands[0].startswith("load folder") and commands[-1].startswith("ocr "), commands
    again = invoke(["load", "folder", db_path, folder, *model_args, "--ocr", "--quiet"])
    assert "0 maps to read, 2 already read" in again.output


def test_a_load_with_ocr_where_ocr_cannot_run_stops_before_anything_is_made(tmp_path, model_args, invoke, monkeypatch):
    from loaders import ocr

    def unavailable():
        raise ocr.OcrUnavailable("OCR needs rapidocr: pip install 'datasette-mapclip[load]'")

    monkeypatch.setattr(ocr, "import_rapidocr", unavailable)
    folder = tmp_path / "maps"
    folder.mkdir()
    paper((480, 360)).save(folder / "blank.png")
    out = invoke(["load", "folder", tmp_path / "maps.db", folder, *model_args, "--ocr"], expect=1)
    assert "OCR needs rapidocr" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "maps.db").exists()


def test_large_iiif_sheets_are_read_at_full_resolution_as_region_tiles(loc_server, tmp_path, invoke, model_args,
                                                                        monkeypatch):
    """--full-resolution: a IIIF sheet larger than --ocr-size is read tile by tile as full-size IIIF
    regions (its size from info.json), never whole; words land where they are printed on the sheet."""
    import loc_server as served

    sheet = paper(served.DEEP_ZOOM_SIZE)  # 1200 x 880
    truth = {"Hagerstown": put(sheet, "Hagerstown", (60, 80)),
             "Cumberland": put(sheet, "Cumberland", (500, 430))}  # across two tile columns' edge
    monkeypatch.setattr(served, "deep_zoom_image", lambda service: sheet.copy())
    server = loc_server(items=1, per_page=4)
    db_path = tmp_path / "loc.db"
    invoke(["load", "loc", db_path, f"{server.url}/collections/test-maps/", "--rate", "0", *model_args])
    before = len(server.requests)
    out = invoke(["ocr", db_path, "--ocr-size", "512", "--full-resolution", "--tile", "512", "--overlap", "192",
                  "--rate", "0", "--quiet"])
    asked = [path.split("/", 3)[3] for path in server.requests[before:] if path.startswith("/iiif/")]
    regions = [path for path in asked if path != "info.json"]
    assert "info.json" in asked and len(regions) == 12, asked  # 4 columns x 3 rows of at most 512 px
    for path in regions:
        x, y, w, h = (int(v) for v in path.split("/")[0].split(","))
        assert path.endswith("/full/0/default.jpg") and max(w, h) <= 512 and x + w <= 1200 and y + h <= 880, path
    assert "read 1 maps" in out.output
    conn = open_db(db_path)
    (map_id,) = conn.execute("SELECT id FROM maps").fetchone()
    from datasette_mapclip.store import read_map_words

    found = {word["text"]: word for word in read_map_words(conn, map_id)}
    assert sorted(found) == sorted(truth), found
    for text, (x, y, w, h) in truth.items():
        word = found[text]
        assert abs(word["x"] - x) < 0.02 and abs(word["y"] - y) < 0.03, (text, word, (x, y))
    assert tuple(conn.execute("SELECT width, height FROM map_words_read").fetchone()) == (1200, 880)


# -- spaces between words (loaders/ocr_spacing.py) ---------------------------------------------

PLAIN_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def lines_read(names: list[str], *, respace: bool = True, font_file: str = PLAIN_FONT, size: int = 18) -> list[str]:
    """``names`` drawn one a line (normal word spacing, dark on map paper), read by the real engine;
    the texts read, top to bottom."""
    from loaders.ocr import OcrEngine, OcrSettings

    try:
        face = ImageFont.truetype(font_file, size)
    except OSError:
        pytest.skip(f"{font_file} is not installed")
    sheet = Image.new("RGB", (640, 50 * len(names) + 40), (236, 228, 205))
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(names):
        draw.text((30 + (i % 2) * 100, 30 + i * 50), name, font=face, fill=(25, 25, 25))
    words = OcrEngine(OcrSettings(threads=1, respace=respace)).read(sheet)
    return [word.text for word in sorted(words, key=lambda word: word.y)]


def crossed_names_read(names: list[str], *, respace: bool) -> list[str]:
    """``names`` drawn one a line in DejaVu Serif 18 px, each over two fills that meet at its first space, with
    a 4 px boundary line through that space (as a demo map's "Oriskany Sandstone" crosses two strata), read
    by the real engine; the texts read, top to bottom."""
    from loaders.ocr import OcrEngine, OcrSettings

    face = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf", 18)
    sheet = Image.new("RGB", (700, 50 * len(names) + 40), (190, 215, 180))
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(names):
        x, y = 30 + (i % 2) * 100, 30 + i * 50
        gap = x + face.getlength(name.split(" ")[0] + " ") - face.getlength(" ") / 2
        draw.polygon([(gap + 10, y - 12), (700, y - 12), (700, y + 40), (gap - 10, y + 40)], fill=(215, 225, 150))
        draw.line([(gap + 10, y - 12), (gap - 10, y + 40)], fill=(70, 50, 60), width=4)
        draw.text((x, y), name, font=face, fill=(25, 25, 25))
    words = OcrEngine(OcrSettings(threads=1, respace=respace)).read(sheet)
    return [word.text for word in sorted(words, key=lambda word: word.y)]


def test_names_of_several_words_are_read_with_their_spaces():
    """Two-word names and a title at 18 px in DejaVu Sans on plain paper come out word for word.  Where a
    line crosses the space between two words the recogniser often lets "no character" win over "space"
    there ("OuterBar"); the spaces it all but read are put back, and no word is split."""
    names = ["Map of the city of Portland", "Political map of Africa", "Outer Bar", "New Bern", "Kitty Hawk"]
    assert lines_read(names) == names
    crossed = ["Princess Anne", "New Bern", "Outer Bar", "Kitty Hawk", "Bodie Island", "Oriskany Sandstone",
               "Cape Henry", "Sandy Hook", "Pamlico Sound", "Court House", "Political map of Africa"]
    respaced, as_read = crossed_names_read(crossed, respace=True), crossed_names_read(crossed, respace=False)
    # the sheet tests the respacing: more names come out word for word with it (measured: 2 and 0) ...
    assert sum(text in crossed for text in respaced) > sum(text in crossed for text in as_read)
    # ... and every word it reads is one or more of the name's words run together, never part of one
    for text in respaced:
        name = next(name for name in crossed if name.replace(" ", "") == text.replace(" ", ""))
        words = name.split()
        for word in text.split():
            assert any("".join(words[i:j]) == word for i in range(len(words)) for j in range(i + 1, len(words) + 1)), \
                (word, name)


@pytest.mark.parametrize("font_file", [PLAIN_FONT, "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Italic.ttf"])
def test_a_single_word_with_wide_letters_is_not_split(font_file):
    """Wide letters ("mm", "W") leave gaps between characters as wide as a space; no space is put
    where the recogniser saw none."""
    names = ["Westminster", "Grantsville", "Hammondsport", "Wilmington", "Mummasburg", "Williamsport"]
    assert lines_read(names, font_file=font_file, size=20) == names


def test_the_spacing_method_is_part_of_the_recorded_settings():
    """What changes a reading is recorded (ocr_models.settings): a reader that puts spaces back
    another way is another OCR model, so `mapclip ocr` reads the maps again."""
    from loaders.ocr import OcrSettings
    from loaders.ocr_spacing import SPACING_METHOD

    assert OcrSettings().recorded()["respace"] == SPACING_METHOD
    assert OcrSettings(respace=False).recorded()["respace"] is False


# -- the detector's settings (OcrSettings.detect_scale, unclip_ratio, weak_box_thresh) ---------

HARD_NAMES = ["Annapolis", "Worcester", "Goldsboro", "Somerset", "Frederick", "Lumberton", "Middletown", "Aurora",
              "Pocomoke", "Williamston", "Crisfield", "Antietam", "Nanticoke", "Westernport", "Currituck", "Harmony"]


def hard_sheet() -> Image.Image:
    """A 1,024 px sheet of names 16-18 px high in DejaVu Sans, as the demo's hard labels are set: every
    other one over a hatched patch (1 px lines at 45 degrees every 6 px), the rest faint (the paper's
    colour at 0.56, about 1.8:1)."""
    try:
        ImageFont.truetype(PLAIN_FONT, 16)
    except OSError:
        pytest.skip(f"{PLAIN_FONT} is not installed")
    paper_colour = (236, 228, 205)
    sheet = Image.new("RGB", (1024, 1024), paper_colour)
    draw = ImageDraw.Draw(sheet)
    x0, y0, x1, y1 = 40, 40, 480, 980
    for offset in range(-(y1 - y0), x1 - x0, 6):
        draw.line([(x0 + max(offset, 0), y0 + max(-offset, 0)),
                   (x0 + min(offset + y1 - y0, x1 - x0), y0 + min(y1 - y0, x1 - x0 - offset))], fill=(80, 110, 80))
    for i, name in enumerate(HARD_NAMES):
        hatched = i % 2 == 0
        colour = (25, 25, 25) if hatched else tuple(int(c * 0.56) for c in paper_colour)
        draw.text((60 + (i % 4 < 2) * 10 + (0 if hatched else 540), 60 + i * 55), name,
                  font=ImageFont.truetype(PLAIN_FONT, 16 + i % 3), fill=colour)
    return sheet


def test_names_over_hatching_and_faint_names_are_read_and_a_crop_turned_wrongly_is_read_upright():
    """Every name of this sheet, faint or over hatching, is read letter for letter.  Seen 1.5 times larger,
    the crop of one of them ("Goldsboro" over hatching) is turned upside down by the orientation model, and
    read that way it comes out "oJoqsploo": a crop it turns is also read as cut, and the more confident
    reading kept (``OcrSettings.check_turned``)."""
    from loaders.ocr import OcrEngine, OcrSettings

    sheet = hard_sheet()

    def found(settings: OcrSettings) -> set[str]:
        read = {word.text.casefold() for word in OcrEngine(settings).read(sheet)}
        return {name for name in HARD_NAMES if name.casefold() in read}

    assert found(OcrSettings(threads=1)) == set(HARD_NAMES)
    assert found(OcrSettings(threads=1, detect_scale=1.5)) == set(HARD_NAMES)
    # the sheet tests the check: trusting the orientation model, a name is lost
    assert "Goldsboro" not in found(OcrSettings(threads=1, detect_scale=1.5, check_turned=False))


def test_the_detector_settings_are_part_of_the_recorded_settings():
    from loaders.ocr import OcrSettings

    recorded = OcrSettings().recorded()
    assert (recorded["detect_scale"], recorded["unclip_ratio"], recorded["weak_box_thresh"]) == (1.0, 1.75, None)
    assert recorded["check_turned"] is True
    assert OcrSettings(detect_scale=1.5).recorded() != recorded
    assert OcrSettings(check_turned=False).recorded() != recorded
    with pytest.raises(ValueError):
        OcrSettings(detect_scale=0)


# -- the detector's input is bounded (OcrSettings.detect_max_side, source_tiles) -----------------

def detector_inputs(engine) -> list[tuple[int, int]]:
    """(height, width) of every tensor the engine's detector is run on, from now on."""
    det = engine.detector
    shapes, infer = [], det.session
    det.session = lambda tensor: shapes.append(tuple(tensor.shape[2:])) or infer(tensor)
    return shapes


def test_tiles_are_cut_so_the_detector_sees_no_side_over_its_bound():
    """A tile is seen detect_scale times larger: tiles are cut at most detect_max_side / detect_scale px, so
    the default 2,048 px tile at 1.5 (a 3,072 px input, 1.6 GB) becomes 1,365 px (2,048 px seen); at the
    default 1.0 it stays 2,048 px."""
    from loaders.ocr import OcrEngine, OcrSettings

    assert OcrSettings().source_tiles == (2048, 256)
    assert OcrSettings(detect_scale=1.5).source_tiles == (1365, 256)
    assert OcrSettings(tile=1024).source_tiles == (1024, 256)
    assert OcrSettings(tile=4096, overlap=1000, detect_scale=1.5).source_tiles == (1365, 681)  # overlap < half a tile
    assert OcrSettings().recorded()["detect_max_side"] == 2048
    with pytest.raises(ValueError):
        OcrSettings(detect_max_side=1000)
    # scaled down: a bound of 1,024 px on a 960 x 640 sheet (seen whole at 1.5 it would be 1,440 px)
    sheet = paper(SHEET)
    put(sheet, "Hagerstown", (40, 60))
    put(sheet, "Cumberland", (372, 470))  # across the cut between the two columns of tiles
    engine = OcrEngine(OcrSettings(threads=1, detect_scale=1.5, detect_max_side=1024))
    shapes = detector_inputs(engine)
    texts = [word.text for word in engine.read(sheet)]
    assert len(shapes) == 2 and max(max(shape) for shape in shapes) <= 1024, shapes
    assert sorted(text.replace(" ", "") for text in texts) == ["Cumberland", "Hagerstown"]  # read: "Cum berland"


def test_a_thin_tile_is_not_stretched_past_the_detectors_bound():
    """RapidOCR scales a tile's shorter side up to 736 px: a strip (padded to 4:1) would reach 2,944 px;
    it is scaled to the bound instead, and its words are still read."""
    from loaders.ocr import OcrEngine, OcrSettings

    strip = Image.new("RGB", (1400, 120), (236, 228, 205))
    put(strip, "Hagerstown", (100, 40))
    put(strip, "Cumberland", (1000, 40))
    engine = OcrEngine(OcrSettings(threads=1))
    shapes = detector_inputs(engine)
    texts = [word.text for word in engine.read(strip)]
    assert shapes and max(max(shape) for shape in shapes) <= 2048, shapes
    assert sorted(texts) == ["Cumberland", "Hagerstown"]
