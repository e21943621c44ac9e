"""The SQL of a search: what is shown to users (runnable in Datasette as it stands) and what runs.

Both are one sqlite-vec KNN over the model's ``vec0`` table with the filters inside it.  The shown
SQL builds its query vector with the SQL functions (``mapclip_embed_text(:q)``, the stored vector of
``:like``, ``mapclip_combine``); the SQL that runs takes the vector the search service already
built (``:query_vector``), so the model never runs inside a database thread.
"""

from __future__ import annotations

import dataclasses

from ..store import RESULT_COLUMNS
from ..store.words import has_words, joined_term, words_query_terms
from . import query_vector
from .errors import BadSearch
from .query import VEC0_MAX_K, SearchParams


@dataclasses.dataclass
class SearchPlan:
    """The SQL of one search: shown to users (``sql``, ``params``) and run (``run_sql``, ``run_params``
    plus ``query_vector``)."""

    sql: str
    params: dict
    run_sql: str
    run_params: dict


def filter_conditions(params: SearchParams, sql_params: dict, *, fts_per_row: bool = False,
                      place_index: bool = False) -> list[str]:
    """The filters as conditions on ``maps`` (parameters added to ``sql_params``).  ``fts_per_row``:
    the full-text condition as a per-row lookup, for checking a few candidate ids (the ``IN`` form
    reads every match first, which is what a whole-collection filter wants).  ``place_index``: the
    file has ``maps_place`` (a trigram index), which finds the maps of a place without reading every
    row; ``LIKE`` still decides, so the answer is the same with or without it."""
    conditions = []
    if params.year_min is not None:
        conditions.append("year >= :year_min")
        sql_params["year_min"] = params.year_min
    if params.year_max is not None:
        conditions.append("year <= :year_max")
        sql_params["year_max"] = params.year_max
    if params.place:
        if place_index and uses_place_index(params.place):
            conditions.append("id IN (SELECT rowid FROM maps_place WHERE place LIKE '%' || :place || '%')")
        conditions.append("place LIKE '%' || :place || '%'")
        sql_params["place"] = params.place
    if params.filter:
        conditions.append("EXISTS (SELECT 1 FROM maps_fts WHERE maps_fts MATCH :filter AND rowid = maps.id)"
                          if fts_per_row else "id IN (SELECT rowid FROM maps_fts WHERE maps_fts MATCH :filter)")
        sql_params["filter"] = fts_query(params.filter)
    if params.words:
        conditions.append(words_condition(params.words, sql_params))
    return conditions


# A map whose words (map_words, read by OCR) match one FTS5 term somewhere on it.
_WORD_ON_MAP = ("id IN (SELECT map_id FROM map_words WHERE id IN "
                "(SELECT rowid FROM map_words_fts WHERE map_words_fts MATCH :{name}))")


def words_condition(text: str, sql_params: dict) -> str:
    """Maps that print every word of ``text`` (each anywhere on the map; case and accents folded),
    or all of them run together as one word (OCR often drops the space in "Cape Fear")."""
    terms = words_query_terms(text)
    if not terms:
        raise BadSearch("words: give a word printed on the maps to look for (letters or digits)")
    parts = []
    for n, term in enumerate(terms, 1):
        sql_params[f"words_{n}"] = term
        parts.append(_WORD_ON_MAP.format(name=f"words_{n}"))
    condition = " AND ".join(parts)
    joined = joined_term(text)
    if joined:
        sql_params["words_joined"] = joined
        condition = f"(({condition}) OR {_WORD_ON_MAP.format(name='words_joined')})"
    return condition


def words_were_read(conn) -> bool:
    """Whether OCR has read any map of this file (a ``words`` filter has something to find)."""
    return has_words(conn) and conn.execute("SELECT 1 FROM map_words_read LIMIT 1").fetchone() is not None


def matched_words_sql(text: str, map_ids: list[int], sql_params: dict) -> str:
    """The words read on these maps that match any word of ``text``: what a result shows."""
    terms = words_query_terms(text)
    joined = joined_term(text)
    sql_params["words_any"] = " OR ".join([*terms, *([joined] if joined else [])])
    sql_params["words_maps"] = "[" + ",".join(str(int(i)) for i in map_ids) + "]"
    return ("SELECT map_id, text, id FROM map_words WHERE map_id IN (SELECT value FROM json_each(:words_maps)) "
            "AND id IN (SELECT rowid FROM map_words_fts WHERE map_words_fts MATCH :words_any) "
            "ORDER BY map_id, confidence DESC")


def uses_place_index(place: str) -> bool:
    """The trigram index answers a LIKE pattern from its index only with 3 characters in a row that
    are not wildcards; shorter patterns would read the whole index, no faster than the table."""
    return any(len(run) >= 3 for run in place.replace("_", "%").split("%"))


def filter_clause(params: SearchParams, sql_params: dict, *, place_index: bool = False) -> str:
    """A ``map_id IN (...)`` constraint that sqlite-vec applies inside the KNN."""
    conditions = filter_conditions(params, sql_params, place_index=place_index)
    if not conditions:
        return ""
    return "\n  AND v.map_id IN (SELECT id FROM maps WHERE " + " AND ".join(conditions) + ")"


def passing_ids_sql(params: SearchParams, sql_params: dict) -> str:
    """Which of the candidate ids in ``:ids`` (a JSON array) pass the search's filters."""
    conditions = filter_conditions(params, sql_params, fts_per_row=True)
    return ("SELECT id FROM maps WHERE id IN (SELECT value FROM json_each(:ids)) AND "
            + " AND ".join(conditions))


def matching_ids_sql(params: SearchParams, sql_params: dict, *, place_index: bool = False) -> str:
    """Every id that passes the search's filters."""
    return "SELECT id FROM maps WHERE " + " AND ".join(
        filter_conditions(params, sql_params, place_index=place_index))


def fts_query(text: str) -> str:
    """Free text -> an FTS5 query of quoted terms (all must match), so no syntax errors reach users."""
    terms = [t.replace('"', "") for t in text.split() if t.replace('"', "")]
    return " ".join(f'"{t}"' for t in terms)


def query_vector_sql(params: SearchParams, model: dict, sql_params: dict) -> str:
    """The SQL expression of the query vector: readable, and runnable in Datasette as it stands."""
    table = model.vector_table
    model_arg = ", :model" if params.model else ""
    if params.model:
        sql_params["model"] = params.model
    if not params.is_simple:
        return _terms_and_feedback_sql(params, table, model_arg, sql_params)
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


def _terms_and_feedback_sql(params: SearchParams, table: str, model_arg: str, sql_params: dict) -> str:
    """Many terms and relevance feedback as one ``mapclip_combine`` (feedback around the terms'
    own combination), the same arithmetic in the same order as ``query_vector.with_feedback``."""
    parts = []
    for n, term in enumerate(params.all_terms(), 1):
        if term.kind == "text":
            sql_params[f"text_{n}"] = term.value
            expression = f"mapclip_embed_text(:text_{n}{model_arg})"
        elif term.kind == "map":
            sql_params[f"map_{n}"] = term.value
            expression = f"(SELECT embedding FROM [{table}] WHERE map_id = :map_{n})"
        else:
            sql_params[f"image_{n}"] = term.value.hex()
            expression = f"unhex(:image_{n})"
        sql_params[f"weight_{n}"] = term.weight
        parts.append((expression, f":weight_{n}"))
    if len(parts) == 1 and params.all_terms()[0].weight > 0:
        query = parts[0][0]  # one term is only normalised (mapclip_combine would do the same)
    else:
        query = "mapclip_combine(" + ", ".join(f"{e}, {w}" for e, w in parts) + ")" if parts else None
    if not params.more and not params.fewer:
        return query
    feedback = [(query, ":feedback_query")] if query else []
    if query:
        sql_params["feedback_query"] = query_vector.FEEDBACK_QUERY
    for name, ids, total in (("more", params.more, query_vector.FEEDBACK_MORE),
                             ("fewer", params.fewer, -query_vector.FEEDBACK_FEWER)):
        if ids:
            sql_params[f"{name}_weight"] = total / len(ids)
        for n, map_id in enumerate(ids, 1):
            sql_params[f"{name}_{n}"] = map_id
            feedback.append((f"(SELECT embedding FROM [{table}] WHERE map_id = :{name}_{n})", f":{name}_weight"))
    return "mapclip_combine(\n    " + ",\n    ".join(f"{e}, {w}" for e, w in feedback) + ")"


def knn_sql(vector_table: str, vector_sql: str, filters: str) -> str:
    return f"""SELECT
  {RESULT_COLUMNS},
  1 - v.distance * v.distance / 2 AS similarity
FROM [{vector_table}] v
JOIN maps ON maps.id = v.map_id
WHERE v.embedding MATCH {vector_sql}
  AND v.k = :k{filters}
ORDER BY v.distance
LIMIT :limit OFFSET :offset"""


def plan(params: SearchParams, model: dict, *, place_index: bool = False) -> SearchPlan:
    shown_params: dict = {}
    vector_sql = query_vector_sql(params, model, shown_params)
    filter_params: dict = {}
    filters = filter_clause(params, filter_params, place_index=place_index)
    paging = {"k": params.k * params.page, "limit": params.k, "offset": params.k * (params.page - 1)}
    # The search runs for one map more than the page shows: whether a next page has anything on it.
    peek = {"k": min(params.k * params.page + 1, VEC0_MAX_K), "limit": params.k + 1, "offset": paging["offset"]}
    return SearchPlan(
        sql=knn_sql(model.vector_table, vector_sql, filters),
        params={**shown_params, **filter_params, **paging},
        run_sql=knn_sql(model.vector_table, ":query_vector", filters),
        run_params={**filter_params, **peek},
    )
