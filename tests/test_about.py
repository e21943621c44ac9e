"""The "About this search" page (/-/mapclip/about): the collection's model provenance in plain words,
the known weaknesses, what a score means, how to report a problem; Datasette's permissions; escaping."""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import sqlite3
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cut_permission_checks, load_collection, make_datasette, public_secret_plain
from datasette_mapclip.store import MapStore

ROOT = {"id": "root"}
HOSTILE = '"><script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 8)


@pytest.fixture(scope="module")
def model_row(collection):
    store = MapStore(collection[0])
    row = store.model()
    store.close()
    return row


@pytest.fixture(scope="module")
def collections(collection, tmp_path_factory):
    return public_secret_plain(collection[0], tmp_path_factory.mktemp("about-perm"))


def cookies(ds, actor):
    return {"ds_actor": ds.sign({"a": actor}, "actor")}


def text_of(page: str) -> str:
    """The page's visible words, whitespace collapsed (for assertions on sentences that wrap)."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


async def test_about_page_shows_the_collections_model_provenance(collection, model_row):
    ds = make_datasette([str(collection[0])])
    response = await ds.client.get("/-/mapclip/about")
    assert response.status_code == 200
    page = response.text
    words = text_of(page)
    assert model_row["name"] in words and model_row["architecture"] == "mapclip-tiny"
    assert "Architecture mapclip-tiny" in words
    # developer details are one link away, in the models row's JSON: not on the page
    assert model_row["checkpoint_sha256"] not in words and model_row["torch_version"] not in words
    record = re.search(r'<a href="([^"]+)">the model\'s provenance record</a>', page).group(1)
    row = (await ds.client.get(record.replace("&amp;", "&"))).json()
    assert model_row["checkpoint_sha256"] in json.dumps(row)  # the whole fingerprint, to check a copy against
    assert "a weights file supplied by the publisher" in words  # no pretrained tag: a checkpoint
    assert model_row["checkpoint_path"] not in page  # a path on the server is nobody's business
    assert "used by default" in words
    for subject in ("What the model was and was not trained on", "English only", "Modern-photo bias",
                    "Text-heavy sheets", "Offensive historical labels", "not a probability",
                    "How to report a problem", "cannot be compared"):
        assert subject in words, subject
    assert 'id="scores"' in page  # the search page links here
    # ... and the same for the collection named
    named = await ds.client.get("/-/mapclip/about?_db=maps")
    assert named.status_code == 200 and "the model's provenance record" in html.unescape(named.text)
    assert '<a href="/-/mapclip?_db=maps">' in named.text


@pytest.mark.parametrize("pretrained,source", [
    ("openai", "OpenAI's original CLIP weights"),
    ("laion2b_s34b_b79k", "LAION-2B"),
    ("some_new_tag", "open_clip calls “some_new_tag”"),
])
async def test_pretrained_weights_are_described_in_plain_words(collection, tmp_path, pretrained, source):
    copy = tmp_path / "maps.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    store.conn.execute("UPDATE models SET pretrained = ?, checkpoint_sha256 = NULL", (pretrained,))
    store.close()
    words = text_of((await make_datasette([str(copy)]).client.get("/-/mapclip/about")).text)
    assert source in words and f"Pretrained weights tag {pretrained}" in words
    assert "It learned from the web." in words and "Its weights come from the publisher" not in words


async def test_the_general_sections_say_what_is_true_of_this_collections_model(collection):
    """A model from a checkpoint (the demo's, trained from scratch) is not said to have learned from
    the web; the image size it reads is the recorded one; no score range is promised."""
    words = text_of((await make_datasette([str(collection[0])]).client.get("/-/mapclip/about")).text)
    assert "Its weights come from the publisher." in words and "It learned from the web." not in words
    assert "(64 by 64 pixels)" in words and "a few hundred pixels" not in words
    assert "between about 0.1 and 0.4" not in words and "differs from model to model" in words


async def test_publisher_notes_and_report_channels_come_from_the_plugin_config(collection):
    config = {"model_note": "Fine-tuned on 10,000 <em>catalogue</em> captions.", "training_note": "Trained in 2026.",
              "report_url": "https://maps.example.org/report?from=search", "contact": "maps@example.org"}
    ds = make_datasette([str(collection[0])], metadata={"plugins": {"datasette-mapclip": config}})
    page = (await ds.client.get("/-/mapclip/about")).text
    assert "Fine-tuned on 10,000 &lt;em&gt;catalogue&lt;/em&gt; captions." in page  # text, escaped
    assert "Trained in 2026." in page
    assert '<a href="https://maps.example.org/report?from=search">Report a problem</a>' in page
    assert "Contact: maps@example.org" in page
    unset = (await make_datasette([str(collection[0])]).client.get("/-/mapclip/about")).text
    assert "has not named a place for reports" in unset


async def test_everything_from_the_database_and_config_is_escaped_and_only_http_becomes_a_link(collection, tmp_path):
    copy = tmp_path / "maps.db"
    shutil.copy(collection[0], copy)
    store = MapStore(copy)
    store.conn.execute("UPDATE models SET name = ?, architecture = ?, pretrained = ?, checkpoint_sha256 = ?, "
                       "open_clip_version = ?, created_at = ?",
                       ("N" + HOSTILE, "A" + HOSTILE, "P" + HOSTILE, "S" + HOSTILE, "O" + HOSTILE, "C" + HOSTILE))
    store.close()
    for report_url in ("javascript:alert(1)", " JaVaScRiPt:alert(2)", "data:text/html,<script>alert(3)</script>",
                       "//evil.example/x", "vbscript:x"):
        ds = make_datasette([str(copy)], metadata={
            "title": "T" + HOSTILE,
            "databases": {"maps": {"title": "D" + HOSTILE}},
            "plugins": {"datasette-mapclip": {"report_url": report_url, "contact": "C" + HOSTILE,
                                              "model_note": "M" + HOSTILE}}})
        response = await ds.client.get("/-/mapclip/about")
        assert response.status_code == 200
        page = response.text
        assert "<script>alert" not in page and "onerror=alert(1)>" not in page
        assert "javascript:" not in page.lower() and "vbscript:" not in page and "evil.example" not in page
        assert "data:text/html" not in page
        words = text_of(page)
        for prefix in ("N", "A", "P", "C", "M", "D"):  # (S: the fingerprint is in the row's JSON, not here)
            assert prefix + HOSTILE in words, prefix  # shown, whole, as text
        hrefs = re.findall(r'href="([^"]*)"', page)
        assert all(h.startswith(("/", "https://", "http://", "#")) and not h.startswith("//") for h in hrefs), hrefs


PRIVATE_DATABASE = {"databases": {"secret": {"allow": ROOT}}}
PRIVATE_TABLE = {"databases": {"secret": {"tables": {"maps": {"allow": ROOT}}}}}


@pytest.mark.parametrize("metadata", [PRIVATE_DATABASE, PRIVATE_TABLE], ids=["private-database", "private-table"])
async def test_a_collection_the_actor_cannot_view_is_neither_listed_nor_described(collections, metadata):
    ds = make_datasette([str(p) for p in collections], metadata=metadata)
    anonymous = await ds.client.get("/-/mapclip/about")
    assert anonymous.status_code == 200
    assert "secret" not in anonymous.text  # not listed, not described, not linked
    assert text_of(anonymous.text).count("The model behind") == 1
    assert "/-/mapclip?_db=maps" in anonymous.text
    refused = await ds.client.get("/-/mapclip/about?_db=secret")
    assert refused.status_code == 403 and "The model behind" not in refused.text
    # a database that is not a collection, or does not exist: the same 404, no names
    for name in ("plain", "nope", "_internal"):
        missing = await ds.client.get("/-/mapclip/about?_db=" + name)
        assert missing.status_code == 404 and "secret" not in missing.text, name
    root = await ds.client.get("/-/mapclip/about", cookies=cookies(ds, ROOT))
    assert root.status_code == 200 and text_of(root.text).count("The model behind") == 2
    assert "/-/mapclip?_db=secret" in root.text
    assert (await ds.client.get("/-/mapclip/about?_db=secret", cookies=cookies(ds, ROOT))).status_code == 200


async def test_an_instance_closed_to_anonymous_visitors_keeps_its_about_page_closed(collections):
    ds = make_datasette([str(p) for p in collections], metadata={"allow": ROOT})
    assert (await ds.client.get("/-/mapclip/about")).status_code == 403
    assert (await ds.client.get("/-/mapclip/about?_db=maps")).status_code == 403
    assert (await ds.client.get("/-/mapclip/about", cookies=cookies(ds, ROOT))).status_code == 200


async def test_a_permission_check_cut_by_the_time_limit_is_a_503_not_a_500(collection, monkeypatch):
    from datasette.database import QueryInterrupted

    ds = make_datasette([str(collection[0])], settings={"sql_time_limit_ms": 50})

    async def cut(*args, **kwargs):
        raise QueryInterrupted(Exception("interrupted"), "select 1", {})

    cut_permission_checks(monkeypatch, ds, cut)
    for path in ("/-/mapclip/about", "/-/mapclip/about?_db=maps"):
        response = await ds.client.get(path)
        assert response.status_code == 503, (path, response.status_code, response.text[:300])
        assert "took longer than this server's 50 ms limit" in response.text


async def test_a_collection_without_embeddings_is_described_without_error(tmp_path):
    db = tmp_path / "empty.db"
    MapStore(db).close()  # the schema, no model yet
    ds = make_datasette([str(db)])
    response = await ds.client.get("/-/mapclip/about")
    assert response.status_code == 200 and "no searchable maps yet" in response.text


@pytest.fixture(scope="module")
def served(collection):
    loop = asyncio.new_event_loop()
    yield make_datasette([str(collection[0])]), loop
    loop.close()


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["_db", "q", "x"]), st.one_of(
    st.text(max_size=200), st.sampled_from(["maps", "_internal", "", " ", "\x00", "maps\x00", "../maps"])), max_size=3))
def test_about_page_never_answers_5xx(served, args):
    ds, loop = served
    response = loop.run_until_complete(ds.client.get("/-/mapclip/about?" + urllib.parse.urlencode(args)))
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert "Traceback" not in response.text


async def test_a_provenance_table_that_cannot_be_read_is_reported_not_a_500(collection, monkeypatch):
    from datasette_mapclip.web import about

    ds = make_datasette([str(collection[0])])
    assert (await ds.client.get("/-/mapclip/about")).status_code == 200

    async def damaged(*args, **kwargs):
        raise sqlite3.OperationalError("no such column: id")

    monkeypatch.setattr(about, "describe_collection", damaged)
    response = await ds.client.get("/-/mapclip/about")
    assert response.status_code == 200 and "could not be read" in response.text
    assert "no such column" not in response.text


@pytest.mark.parametrize("allow", [False, ROOT])
async def test_provenance_is_hidden_from_an_actor_who_may_not_view_the_models_table(collection, model_row, allow):
    ds = make_datasette([str(collection[0])], metadata={"databases": {"maps": {"tables": {"models": {"allow": allow}}}}})
    hidden = [model_row["checkpoint_sha256"], model_row["torch_version"], model_row["open_clip_version"]]
    assert all(hidden)
    for path in ("/-/mapclip/about?_db=maps", "/-/mapclip/about"):
        response = await ds.client.get(path)
        assert response.status_code == 200
        for value in hidden:
            assert value not in response.text, (path, value)
        words = text_of(response.text)
        assert model_row["name"] in words and "has not made the details of this model" in words
        assert "Weights file fingerprint" not in words and "Software" not in words
        assert "provenance record" not in words
    # the search itself is not the models table's: it still works
    assert (await ds.client.get("/-/mapclip/search.json?like=1")).status_code == 200
    if allow:
        shown = await ds.client.get("/-/mapclip/about?_db=maps", cookies=cookies(ds, ROOT))
        assert "the model's provenance record" in html.unescape(shown.text)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory, model_args):
    return load_collection(tmp_path_factory, model_args, 12)


async def _measured_by_searching(ds, titles):
    best, tenth = [], []
    for title in titles:
        response = await ds.client.get("/-/mapclip/search.json?" + urllib.parse.urlencode({"q": title, "k": 10}))
        results = response.json()["results"]
        best.append(results[0]["similarity"])
        tenth.append(results[9]["similarity"])
    return best, tenth


async def test_the_scores_section_gives_the_range_measured_on_this_collection(twelve, monkeypatch):
    from datasette_mapclip import store
    from datasette_mapclip.web import about

    db_path, _ = twelve
    ds = make_datasette([str(db_path)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
    page = await ds.client.get("/-/mapclip/about")
    assert page.status_code == 200
    conn = store.connect(db_path)
    titles = store.read_sample_titles(conn, about.SCORE_SAMPLE)
    conn.close()
    assert sorted(titles) == sorted(f"Map number {i} of Vermont" for i in range(12))  # every title of 12
    best, tenth = await _measured_by_searching(ds, titles)
    model = MapStore(db_path)
    name = model.model()["name"]
    model.close()
    text = text_of(page.text)
    assert (f"Measured on “maps” with the model {name}: searching for 12 of this collection's own map titles, "
            f"the best match scored between {min(best):.2f} and {max(best):.2f}, and the 10th match scored "
            f"between {min(tenth):.2f} and {max(tenth):.2f}.") in text, text
    assert min(best) != max(tenth)  # figures that tell the ranks apart

    # measured once per file and model: a second visit runs no search
    async def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(about, "run_search", no_search)
    again = await ds.client.get("/-/mapclip/about")
    assert f"between {min(best):.2f} and {max(best):.2f}" in text_of(again.text)


async def test_no_score_range_is_claimed_where_none_can_be_measured(twelve, tmp_path):
    db_path, _ = twelve
    untitled = tmp_path / "untitled.db"
    shutil.copy(db_path, untitled)
    store = MapStore(untitled)
    store.conn.execute("UPDATE maps SET title = NULL")
    store.conn.commit()
    store.close()
    no_encoder = tmp_path / "no-encoder.db"
    shutil.copy(db_path, no_encoder)
    store = MapStore(no_encoder)
    store.conn.execute("DELETE FROM query_encoders")
    store.conn.execute("UPDATE models SET checkpoint_sha256 = ?", ("f" * 64,))  # weights found nowhere
    store.conn.commit()
    store.close()
    for path in (untitled, no_encoder):
        ds = make_datasette([str(path)], metadata={"plugins": {"datasette-mapclip": {"index": "off"}}})
        page = await ds.client.get("/-/mapclip/about")
        assert page.status_code == 200
        assert "Measured on" not in page.text and "What the similarity score means" in page.text
