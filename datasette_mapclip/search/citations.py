"""Citing a map, and exporting a result set: one record -> a plain-text citation, BibTeX and
CSL-JSON; results -> CSV and JSON rows with the same fields.

Built from the catalogue fields (title, date, contributors, place, sheet) and the catalogue URL.
The plain text follows the Chicago Manual of Style's pattern for a map in an online collection
(creator. *Title*. Place, date. Map. Repository. URL.), the form the Library of Congress shows
on its own item pages; CSL-JSON (type ``map``) lets Zotero and citation processors render any
other style.  Only http(s) catalogue URLs are cited.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import urllib.parse

from .links import web_url

# The columns a citation reads (besides id); the search service reads them with the result rows.
CITATION_COLUMNS = ("title", "date", "year", "place", "contributors", "item_id", "sheet", "item_url", "source")
# What an export row holds, in order: the search result's own fields (``search.shape_result``).
EXPORT_FIELDS = ("rank", "id", "similarity", "title", "date", "year", "place", "item_id", "sheet", "url",
                 "image_url", "thumbnail_url", "record_url")
LOC_REPOSITORY = "Library of Congress, Geography and Map Division"


def list_field(value) -> list[str]:
    """A stored list field (a JSON array) -> its strings."""
    if not value:
        return []
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return [str(value)]
    return [str(v) for v in parsed if str(v).strip()] if isinstance(parsed, list) else [str(parsed)]


def repository(record: dict, configured: str | None = None) -> str | None:
    """Where the map is held: the publisher's setting (``citation_repository``), else the Library of
    Congress for a loc.gov record, else nothing said."""
    if configured:
        return configured
    url = web_url(record.get("item_url")) or ""
    host = urllib.parse.urlsplit(url).netloc.lower()
    if host == "loc.gov" or host.endswith(".loc.gov") or record.get("source") == "loc":
        return LOC_REPOSITORY
    return None


def _title(record: dict) -> str:
    title = (record.get("title") or "").strip() or f"Untitled map {record.get('id')}"
    sheet = record.get("sheet")
    if sheet not in (None, "") and f"sheet {sheet}".lower() not in title.lower():
        title += f", sheet {sheet}"
    return title


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def plain_text(record: dict, *, repository_name: str | None = None, accessed: datetime.date | None = None) -> str:
    """Chicago style: ``Creator. Title. Place, Date. Map. Repository. URL (accessed Month D, YYYY).``"""
    parts = []
    creators = list_field(record.get("contributors"))
    if creators:
        parts.append(_sentence("; ".join(creators)))
    parts.append(_sentence(_title(record)))
    where_when = ", ".join(p for p in ((record.get("place") or "").strip(), (record.get("date") or "").strip()
                                       or (str(record["year"]) if record.get("year") is not None else "")) if p)
    if where_when:
        parts.append(_sentence(where_when))
    parts.append("Map.")
    held = repository(record, repository_name)
    if held:
        parts.append(_sentence(held))
    url = web_url(record.get("item_url"))
    if url:
        accessed = accessed or datetime.date.today()
        parts.append(f"{url} (accessed {accessed.strftime('%B')} {accessed.day}, {accessed.year}).")
    return " ".join(parts)


_BIBTEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "%": r"\%", "&": r"\&", "$": r"\$",
                   "#": r"\#", "_": r"\_", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _bibtex_text(value: str) -> str:
    """A field's text with every BibTeX/LaTeX special character escaped (no markup gets through)."""
    return "".join(_BIBTEX_SPECIAL.get(ch, ch) for ch in str(value).replace("\r", " ").replace("\n", " "))


def _bibtex_url(url: str) -> str:
    """A url field is verbatim in biblatex/url.sty: only what would unbalance the entry's braces (or
    escape them) is percent-encoded, as any URL may be."""
    return url.replace("\\", "%5C").replace("{", "%7B").replace("}", "%7D")


def bibtex_key(record: dict) -> str:
    """``<item id><year>s<sheet>``, letters and digits only: stable, and one per sheet."""
    def clean(value) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "", str(value if value is not None else ""))

    key = (clean(record.get("item_id")) or f"map{clean(record.get('id'))}") + clean(record.get("year"))
    sheet = clean(record.get("sheet"))
    return key + (f"s{sheet}" if sheet else "")


def bibtex(record: dict, *, repository_name: str | None = None, accessed: datetime.date | None = None) -> str:
    fields = [("title", "{" + _bibtex_text(_title(record)) + "}")]  # double braces keep its capitals
    creators = list_field(record.get("contributors"))
    if creators:
        # corporate names in braces, so BibTeX does not split them into first and last names
        fields.append(("author", " and ".join("{" + _bibtex_text(c) + "}" for c in creators)))
    if record.get("year") is not None:
        fields.append(("year", str(int(record["year"]))))
    if record.get("date") and str(record.get("year")) != str(record["date"]).strip():
        fields.append(("note", "Dated " + _bibtex_text(record["date"])))
    if record.get("place"):
        fields.append(("address", _bibtex_text(record["place"])))
    held = repository(record, repository_name)
    if held:
        fields.append(("organization", _bibtex_text(held)))
    url = web_url(record.get("item_url"))
    if url:
        fields.append(("url", _bibtex_url(url)))
        fields.append(("urldate", (accessed or datetime.date.today()).isoformat()))
    fields.append(("howpublished", "Map"))
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields)
    return f"@misc{{{bibtex_key(record)},\n{body}\n}}\n"


def csl_json(record: dict, *, repository_name: str | None = None, accessed: datetime.date | None = None) -> dict:
    item = {"id": bibtex_key(record), "type": "map", "title": _title(record)}
    creators = list_field(record.get("contributors"))
    if creators:
        item["author"] = [{"literal": c} for c in creators]
    if record.get("year") is not None:
        item["issued"] = {"date-parts": [[int(record["year"])]]}
    elif record.get("date"):
        item["issued"] = {"literal": str(record["date"])}
    if record.get("place"):
        item["publisher-place"] = str(record["place"])
    held = repository(record, repository_name)
    if held:
        item["archive"] = held
    url = web_url(record.get("item_url"))
    if url:
        item["URL"] = url
        day = accessed or datetime.date.today()
        item["accessed"] = {"date-parts": [[day.year, day.month, day.day]]}
    if record.get("item_id"):
        item["archive_location"] = str(record["item_id"])
    return item


def citations(record: dict, *, repository_name: str | None = None, accessed: datetime.date | None = None) -> dict:
    """Every form at once (the map page and ``search.json``'s ``cite`` use it)."""
    kwargs = {"repository_name": repository_name, "accessed": accessed}
    return {"text": plain_text(record, **kwargs), "bibtex": bibtex(record, **kwargs),
            "csl_json": csl_json(record, **kwargs)}


# -- exporting a result set ----------------------------------------------------------------

def export_rows(results: list[dict], first_rank: int = 1) -> list[dict]:
    """Search results -> rows with the export's fields, ranked."""
    return [{"rank": first_rank + i, **{f: r.get(f) for f in EXPORT_FIELDS if f != "rank"}}
            for i, r in enumerate(results)]


def _csv_safe(value):
    """A cell a spreadsheet will not run as a formula (CSV injection): text starting with = + - @
    or a control character gets a leading apostrophe.  Numbers are left as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def results_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(EXPORT_FIELDS), lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_safe(v) for k, v in row.items()})
    return out.getvalue()
