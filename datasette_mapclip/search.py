"""Search: parse the query parameters, build the query vector, run the KNN, shape the results.

The same parameters drive the page (``/-/mapclip``) and the JSON API (``/-/mapclip/search.json``):

    q          text ("nautical chart")
    like       id of a map in the collection: its stored vector, no model run
    vector     hex float32 query vector (what an uploaded image becomes, so searches stay shareable)
    weight     text/image slider in [-1, 1]: -1 image only, 0 equal, +1 text only (the seed's convention)
    k, page    results per page (default 20), page number
    year_min, year_max, place, filter    narrow the vector search itself (inside the KNN)
    model      which model's vectors to search, when a database holds more than one
    _db        which database, when Datasette serves several

Every search is a single sqlite-vec query whose SQL is returned with the results, so it
can be opened, edited and exported in Datasette.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse

import numpy as np

from . import vectors

DEFAULT_K = 20
MAX_K = 200
VEC0_MAX_K = 4096  # sqlite-vec's limit on k


class BadSearch(ValueError):
    """Bad parameters; the message is for the person who sent them (HTTP 400)."""


def _int(args, name, low=None, high=None):
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadSearch(f"{name} must be a whole number, got {raw!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadSearch(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclasses.dataclass
class SearchParams:
    q: str | None = None
    like: int | None = None
    vector: bytes | None = None
    weight: float = 0.0
    k: int = DEFAULT_K
    page: int = 1
    year_min: int | None = None
    year_max: int | None = None
    place: str | None = None
    filter: str | None = None
    model: str | None = None

    @classmethod
    def from_args(cls, args) -> "SearchParams":
        weight_raw = (args.get("weight") or "").strip()
        try:
            weight = float(weight_raw) if weight_raw else 0.0
        except ValueError:
            raise BadSearch(f"weight must be a number between -1 and 1, got {weight_raw!r}") from None
        if not -1 <= weight <= 1 or math.isnan(weight):
            raise BadSearch(f"weight must be between -1 (image only) and 1 (text only), got {weight}")
        vector_hex = (args.get("vector") or "").strip()
        vector = None
        if vector_hex:
            try:
                vector = bytes.fromhex(vector_hex)
            except ValueError:
                raise BadSearch("vector must be hex-encoded float32 bytes") from None
            if not vector or len(vector) % 4:
                raise BadSearch("vector must be hex-encoded float32 bytes (a multiple of 4 bytes)")
        params = cls(
            q=(args.get("q") or "").strip() or None,
            like=_int(args, "like"),
            vector=vector,
            weight=weight,
            k=_int(args, "k", 1, MAX_K) or DEFAULT_K,
            page=_int(args, "page", 1, VEC0_MAX_K) or 1,
            year_min=_int(args, "year_min"),
            year_max=_int(args, "year_max"),
            place=(args.get("place") or "").strip() or None,
            filter=(args.get("filter") or "").strip() or None,
            model=(args.get("model") or "").strip() or None,
        )
        if params.k * params.page > VEC0_MAX_K:
            raise BadSearch(f"page {params.page} of {params.k} goes past the {VEC0_MAX_K} nearest maps that one search can reach")
        return params

    @property
    def has_query(self) -> bool:
        return bool(self.q or self.like is not None or self.vector)

    @property
    def has_filters(self) -> bool:
        return any(v not in (None, "") for v in (self.year_min, self.year_max, self.place, self.filter))

    def weights(self) -> tuple[float, float]:
        """(text weight, image weight): the seed's (1+s)/4 and (1-s)/4; renormalised later."""
        return (1 + self.weight) / 4, (1 - self.weight) / 4

    def query_string(self, **changes) -> str:
        values = dataclasses.asdict(self)
        values.update(changes)
        if values.get("vector") is not None:
            values["vector"] = values["vector"].hex()
        defaults = {"weight": 0.0, "k": DEFAULT_K, "page": 1}
        pairs = [(k, v) for k, v in values.items() if v not in (None, "") and defaults.get(k, object()) != v]
        return urllib.parse.urlencode(pairs)


@dataclasses.dataclass
class SearchPlan:
    """The SQL of one search and its parameters."""

    sql: str
    params: dict
    model: dict


def filter_clause(params: SearchParams, sql_params: dict) -> str:
    """A ``map_id IN (...)`` constraint that sqlite-vec applies inside the KNN."""
    conditions = []
    if params.year_min is not None:
        conditions.append("year >= :year_min")
        sql_params["year_min"] = params.year_min
    if params.year_max is not None:
        conditions.append("year <= :year_max")
        sql_params["year_max"] = params.year_max
    if params.place:
        conditions.append("place LIKE '%' || :place || '%'")
        sql_params["place"] = params.place
    if params.filter:
        conditions.append("id IN (SELECT rowid FROM maps_fts WHERE maps_fts MATCH :filter)")
        sql_params["filter"] = fts_query(params.filter)
    if not conditions:
        return ""
    return "\n  AND v.map_id IN (SELECT id FROM maps WHERE " + " AND ".join(conditions) + ")"


def fts_query(text: str) -> str:
    """Free text -> an FTS5 query of quoted terms (all must match), so no syntax errors reach users."""
    terms = [t.replace('"', "") for t in text.split() if t.replace('"', "")]
    return " ".join(f'"{t}"' for t in terms)


def query_vector_sql(params: SearchParams, model: dict, sql_params: dict) -> str:
    """The SQL expression of the query vector: readable, and runnable in Datasette as it stands."""
    table = model["vector_table"]
    model_arg = ", :model" if params.model else ""
    if params.model:
        sql_params["model"] = params.model
    text = image = None
    if params.q:
        sql_params["q"] = params.q
        text = f"mapclip_embed_text(:q{model_arg})"
    if params.vector is not None:
        sql_params["vector"] = params.vector.hex()
        image = "unhex(:vector)"
    elif params.like is not None:
        sql_params["like"] = params.like
        image = f"(SELECT embedding FROM [{table}] WHERE map_id = :like)"
    if text and image:
        text_weight, image_weight = params.weights()
        sql_params["text_weight"] = text_weight
        sql_params["image_weight"] = image_weight
        return f"mapclip_combine({text}, :text_weight, {image}, :image_weight)"
    return text or image


RESULT_COLUMNS = (
    "maps.id, maps.title, maps.date, maps.year, maps.place, maps.item_id, maps.sheet, "
    "maps.item_url, maps.image_url, maps.thumbnail_url, maps.thumbnail IS NOT NULL AS has_thumbnail"
)


def plan(params: SearchParams, model: dict) -> SearchPlan:
    sql_params: dict = {}
    vector_sql = query_vector_sql(params, model, sql_params)
    filters = filter_clause(params, sql_params)
    sql_params["k"] = params.k * params.page
    sql_params["limit"] = params.k
    sql_params["offset"] = params.k * (params.page - 1)
    sql = f"""SELECT
  {RESULT_COLUMNS},
  1 - v.distance * v.distance / 2 AS similarity
FROM [{model['vector_table']}] v
JOIN maps ON maps.id = v.map_id
WHERE v.embedding MATCH {vector_sql}
  AND v.k = :k{filters}
ORDER BY v.distance
LIMIT :limit OFFSET :offset"""
    return SearchPlan(sql, sql_params, model)


def shape_result(row: dict, database: str, urls) -> dict:
    """A result as the API gives it: links for the catalogue record, thumbnail and full image."""
    map_id = row["id"]
    thumbnail_url = row["thumbnail_url"]
    if row["has_thumbnail"]:
        thumbnail_url = urls.path(f"/-/mapclip/thumbnail/{database}/{map_id}.jpg")
    image_url = row["image_url"] if (row["image_url"] or "").startswith(("http://", "https://")) else None
    record_url = urls.row(database, "maps", str(map_id))
    return {
        "id": map_id,
        "title": row["title"],
        "date": row["date"],
        "year": row["year"],
        "place": row["place"],
        "item_id": row["item_id"],
        "sheet": row["sheet"],
        "similarity": round(float(row["similarity"]), 4),
        "thumbnail_url": thumbnail_url,
        "image_url": image_url or thumbnail_url,
        "url": row["item_url"] or record_url,
        "record_url": record_url,
    }


def check_vector(params: SearchParams, model: dict):
    if params.vector is not None and len(params.vector) != 4 * model["dim"]:
        raise BadSearch(f"vector has {len(params.vector) // 4} floats; model {model['name']} uses {model['dim']}")
    if params.vector is not None and not np.isfinite(vectors.decode(params.vector)).all():
        raise BadSearch("vector contains NaN or infinite values")
