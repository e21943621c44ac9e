"""Kinds of map and the plain query a person would type for each: the labels of the demo's
collection (its ``metadata.csv`` ``kind`` column) and the queries ``evaluate`` scores per kind.
A kind not listed is queried by its name (underscores as spaces)."""

from __future__ import annotations

KINDS: dict[str, str] = {
    "relief": "relief map",
    "political": "political map",
    "street_plan": "city street plan",
    "nautical": "nautical chart",
    "choropleth": "thematic choropleth map",
    "manuscript": "hand-drawn manuscript map",
    "geological": "geological map",
    "fire_insurance": "fire insurance plan",
}
