"""Citations (plain text, BibTeX, CSL-JSON) and result exports built from catalogue fields."""

from __future__ import annotations

import csv
import datetime
import io
import json

from datasette_mapclip.search import citations

DAY = datetime.date(2026, 11, 28)
SANBORN = {
    "id": 7, "title": "Sanborn Fire Insurance Map from Little Rock, Pulaski County, Arkansas",
    "date": "1913", "year": 1913, "place": "Little Rock, Arkansas",
    "contributors": json.dumps(["Sanborn Map Company"]), "item_id": "sanborn00282_004", "sheet": 12,
    "item_url": "https://www.loc.gov/item/sanborn00282_004/", "source": "loc",
}


def test_a_loc_map_is_cited_in_plain_text_with_its_catalogue_url():
    text = citations.plain_text(SANBORN, accessed=DAY)
    assert text == ("Sanborn Map Company. Sanborn Fire Insurance Map from Little Rock, Pulaski County, Arkansas, "
                    "sheet 12. Little Rock, Arkansas, 1913. Map. Library of Congress, Geography and Map Division. "
                    "https://www.loc.gov/item/sanborn00282_004/ (accessed November 28, 2026).")


def test_bibtex_escapes_every_special_character_and_keeps_the_url_verbatim():
    hostile = {**SANBORN, "title": "50% {survey} & plan_of $town #3 \\end{document}",
               "contributors": json.dumps(["Smith & Co. {Ltd}"]),
               "item_url": "https://example.org/item?id=a_b&x=1%20#frag"}
    entry = citations.bibtex(hostile, accessed=DAY)
    assert entry.startswith("@misc{sanborn002820041913s12,\n")
    assert r"50\% \{survey\} \& plan\_of \$town \#3 \textbackslash{}end\{document\}" in entry
    assert "author = {{Smith \\& Co. \\{Ltd\\}}}" in entry
    assert "url = {https://example.org/item?id=a_b&x=1%20#frag}" in entry
    assert "urldate = {2026-11-28}" in entry and "year = {1913}" in entry
    # every brace an entry opens it closes: no field can end the entry early
    depth = 0
    for i, ch in enumerate(entry):
        if ch in "{}" and (i == 0 or entry[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0 and (depth > 0 or i == len(entry) - 2)


def test_csl_json_is_a_map_item_a_citation_processor_reads():
    item = citations.csl_json(SANBORN, accessed=DAY)
    assert item["type"] == "map" and item["author"] == [{"literal": "Sanborn Map Company"}]
    assert item["issued"] == {"date-parts": [[1913]]} and item["accessed"] == {"date-parts": [[2026, 11, 28]]}
    assert item["URL"] == SANBORN["item_url"] and item["archive"] == citations.LOC_REPOSITORY
    assert item["title"].endswith("sheet 12") and item["archive_location"] == "sanborn00282_004"
    json.dumps(item)  # serialisable as it stands


def test_only_http_links_are_cited_and_missing_fields_are_left_out():
    bare = {"id": 3, "title": None, "item_url": "javascript:alert(1)", "contributors": None}
    assert citations.plain_text(bare, accessed=DAY) == "Untitled map 3. Map."
    assert "url" not in citations.bibtex(bare) and "URL" not in citations.csl_json(bare)
    # a local collection names no repository unless the publisher sets one
    local = {"id": 4, "title": "Plan", "item_url": "https://archive.example.org/4", "source": "folder"}
    assert "Library of Congress" not in citations.plain_text(local, accessed=DAY)
    assert "County Archive." in citations.plain_text(local, repository_name="County Archive", accessed=DAY)


def test_result_exports_have_the_same_fields_and_never_carry_a_formula():
    results = [{"id": 1, "similarity": 0.91, "title": "=HYPERLINK(\"http://evil\")", "url": "https://loc.gov/item/1/"},
               {"id": 2, "similarity": 0.5, "title": "-5 m contour plan", "place": "@home"}]
    rows = citations.export_rows(results, first_rank=21)
    assert [r["rank"] for r in rows] == [21, 22] and list(rows[0]) == list(citations.EXPORT_FIELDS)
    parsed = list(csv.DictReader(io.StringIO(citations.results_csv(rows))))
    assert list(parsed[0]) == list(citations.EXPORT_FIELDS)
    assert parsed[0]["title"] == "'=HYPERLINK(\"http://evil\")" and parsed[1]["title"] == "'-5 m contour plan"
    assert parsed[1]["place"] == "'@home" and parsed[0]["similarity"] == "0.91"
