"""The demo's build end to end, small: drawing with lettered sheets, loading, OCR of the lettered
sheets beside the training, evaluation with the OCR and printed-name search figures."""

from __future__ import annotations

import json
import sqlite3

import pytest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from fine_tune.demo.run import Recipe, build

    workdir = tmp_path_factory.mktemp("demo") / "demo"
    recipe = Recipe(count=24, size=64, lettered_per_kind=1, lettered_kinds=("nautical", "political"), seeds=(0,),
                    epochs=1)
    return workdir, build(workdir, recipe)


def test_the_build_read_the_lettered_sheets_into_map_words(built):
    from fine_tune.demo.lettering import read_truth

    workdir, db_path = built
    truth = read_truth(workdir / "collection")
    assert len(truth) == 2
    conn = sqlite3.connect(db_path)
    try:
        read = dict(conn.execute("SELECT maps.source_id, r.word_count FROM map_words_read r "
                                 "JOIN maps ON maps.id = r.map_id").fetchall())
        words = conn.execute("SELECT count(*) FROM map_words").fetchone()[0]
        sizes = set(conn.execute("SELECT width, height FROM map_words_read").fetchall())
    finally:
        conn.close()
    assert set(read) == set(truth)  # the lettered sheets, and only they
    assert all(count >= 5 for count in read.values()) and words == sum(read.values())
    assert sizes == {(1024, 1024)}  # read at full resolution


def test_the_evaluation_reports_ocr_and_printed_name_search(built):
    from fine_tune.demo.lettering import PRINTED_NAMES
    from fine_tune.demo.run import OCR_HEADING, OCR_JSON

    workdir, _ = built
    report = json.loads((workdir / "model" / OCR_JSON).read_text())
    ocr, names = report["ocr"], report["names"]
    assert ocr["sheets"] == 2 and ocr["unread"] == 0
    for part in ("all", "horizontal_14", "rotated_curved"):
        assert 0.3 <= ocr[part]["recall"] <= 1 and ocr[part]["truth_words"] > 0, (part, ocr[part])
    assert 0.5 <= ocr["all"]["precision"] <= 1
    assert [row["name"] for row in names["names"]] == PRINTED_NAMES
    assert names["precision"] >= 0.5 and sum(row["true"] for row in names["names"]) >= 3
    markdown = (workdir / "model" / "evaluation.md").read_text()
    assert "## Map kinds" in markdown and OCR_HEADING in markdown
    assert f"| **all** | {ocr['all']['truth_words']} | {ocr['all']['recall']:.2f} |" in markdown
    assert f"precision@10 {names['precision']:.2f}" in markdown


def test_a_second_build_skips_the_ocr_and_keeps_the_evaluation(built):
    from fine_tune.demo.run import OCR_HEADING, Recipe, build

    workdir, db_path = built
    before = (workdir / "model" / "evaluation.md").read_text()
    conn = sqlite3.connect(db_path)
    marks = conn.execute("SELECT map_id, read_at FROM map_words_read ORDER BY map_id").fetchall()
    conn.close()
    build(workdir, Recipe(count=24, size=64, lettered_per_kind=1, lettered_kinds=("nautical", "political"),
                          seeds=(0,), epochs=1))
    after = (workdir / "model" / "evaluation.md").read_text()
    assert after == before and after.count(OCR_HEADING) == 1
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT map_id, read_at FROM map_words_read ORDER BY map_id").fetchall() == marks
    conn.close()
