"""Captions for fine-tuning, written from the catalogue fields already in the ``maps`` table.

Why: CLIP learns from (image, caption) pairs, and a map collection's captions are its
catalogue records.  The seed's recipe was "A {format} of {title} from {date}, in {location}.
{notes}." (its ``location`` was loc.gov's place names: our ``place`` column).  Catalogue
records are patchy, so a field that is missing is dropped together with the words that
introduce it ("from", ", in"): a caption never reads "from None" or "in ,".

Subject headings ("Nautical charts", "Fire insurance maps") carry the *kind* of map, which
is what people search for; the ``subjects`` template adds them.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping

FIELDS = ("format", "title", "date", "place", "subjects", "notes")

TEMPLATES = {
    # The seed's recipe, with its ``location`` read from our ``place`` column.
    "seed": "A {format} of {title} from {date}, in {place}. {notes}.",
    # The same plus subject headings, which name the kind of map (e.g. "Nautical charts").
    "subjects": "A {format} of {title} from {date}, in {place}. {subjects}. {notes}.",
}
DEFAULT_TEMPLATE = "seed"
# A caption must name *something*; "A map" with no other field says nothing.
DEFAULT_FORMAT = "map"


class TemplateError(ValueError):
    """A caption template that cannot be used; the message says why."""


def resolve_template(name_or_text: str | None) -> str:
    """A preset name (``seed``, ``subjects``) or a Python format string -> the format string."""
    template = TEMPLATES.get(name_or_text or DEFAULT_TEMPLATE, name_or_text)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise TemplateError(f"bad caption template {template!r}: {error}") from None
    used = [field for _, field, _, _ in parts if field is not None]
    unknown = [field for field in used if field not in FIELDS]
    if unknown or not used:
        raise TemplateError(
            f"caption template {template!r} "
            + (f"uses unknown fields {', '.join(unknown)}" if unknown else "uses no fields")
            + f"; use {{{'}, {'.join(FIELDS)}}} or a preset: {', '.join(TEMPLATES)}"
        )
    return template


def caption_values(row: Mapping) -> dict[str, str | None]:
    """The template fields of a ``maps`` row, as clean strings or None when missing.

    ``subjects`` is stored as JSON list text; it becomes "A, B, C"."""
    values: dict[str, str | None] = {}
    for field in FIELDS:
        value = row.get(field) if hasattr(row, "get") else row[field]
        if field == "subjects" and value:
            value = ", ".join(_subject_list(value))
        value = " ".join(str(value).split()) if value is not None else ""
        values[field] = value.strip(" .,;:") or None
    values["format"] = values["format"] or DEFAULT_FORMAT
    return values


def _subject_list(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v]
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = str(value).split(";")
    if isinstance(parsed, str):
        parsed = [parsed]
    return [str(v).strip() for v in parsed if str(v).strip()]


def render_caption(row: Mapping, template: str) -> str:
    """Fill ``template`` from a ``maps`` row; a missing field takes the text just before it along.

    With the seed template, a row with a title and place but no date and no notes gives
    "A map of Plan of Boston, in Massachusetts." (no "from None", no dangling ". .")."""
    values = caption_values(row)
    pieces: list[str] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            pieces.append(literal)
            continue
        value = values.get(field)
        if value is None:
            continue  # drop the field and the connecting words before it ("from", ", in", ". ")
        pieces.append(literal)
        pieces.append(format(value, spec) if spec else value)
    return tidy("".join(pieces))


def tidy(text: str) -> str:
    """Collapse the punctuation left behind by dropped fields: "..", " ,", leading ". "."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?=[.,;:])", "", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = text.strip(" ,;:")
    text = text.lstrip(". ")
    return text[:1].upper() + text[1:]
