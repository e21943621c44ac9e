"""The SQL of a search: what is shown to users (runnable in Datasette as it stands) and what runs.

Both are one sqlite-vec KNN over the model's ``vec0`` table with the filters inside it.  The shown
SQL builds its query vector with the SQL functions (``mapclip_embed_text(:q)``, the stored vector of
``:like``, ``mapclip_combine``); the SQL that runs takes the vector the search service already
built (``:query_vector``), so the model never runs inside a database thread.
"""

from __future__ import annotations

import dataclasses

from ..store import RESULT_COLUMNS
from ..store.words import MAX_QUERY_TERMS, has_words, joined_term, map_word_ids_sql, word_map_sql, words_query_terms
from . import query_vector
from .errors import BadSearch
from .query import VEC0_MAX_K, QueryTerm, SearchParams


@dataclasses.dataclass
class SearchPlan:
    """The SQL of one search: shown to users (``sql``, ``params``) and run (``run_sql``, ``run_params``
    plus ``query_vector``)."""

    sql: str
    params: dict
    run_sql: str
    run_params: dict


def filter_conditions(params: SearchParams, sql_params: dict, *, fts_per_row: bool = False,
                      place_index: bool = False, word_counts: dict | None = None) -> list[str]:
    """The filters as conditions on ``maps`` (parameters added to ``sql_params``).  ``fts_per_row``:
    the full-text condition as a per-row lookup, for checking a few candidate ids (the ``IN`` form
    reads every match first, which is what a whole-collection filter wants).  ``place_index``: the
    file has ``maps_place`` (a trigram index), which finds the maps of a place without reading every
    row; ``LIKE`` still decides, so the answer is the same with or without it.  ``word_counts``
    (``count_word_matches``): how common each ``words`` term is, so that a whole-collection filter
    of several words reads only the rarest one's maps (see ``words_condition``)."""
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
        conditions.append(words_condition(params.words, sql_params, per_row=fts_per_row, counts=word_counts))
    return conditions


# A map whose words (map_words, read by OCR) match one FTS5 term somewhere on it: the map of each
# match is its rowid's (``store.words.word_map_sql``), so only the FTS5 doclist is read.
_WORD_ON_MAP = ("id IN (SELECT " + word_map_sql("map_words_fts.rowid") + " FROM map_words_fts WHERE map_words_fts MATCH :{name})")

# The same, checked map by map (a few candidate maps): one FTS5 lookup per map and term, bounded
# to the rowids the map's own words can have (``store.words.map_word_ids_sql``).  The ``IN`` form
# above reads every match of the term: for a word printed on most maps, millions of doclist
# entries.  A term with few matches is still cheapest read whole, once (a rare name: ~1 ms,
# where the lookups cost 25-100 us a map); which way is decided once per statement, by whether
# the term has more than WORDS_READ_WHOLE_UP_TO matches (a bounded probe of its FTS5 doclist).
# In files whose word ids are row numbers, ``map_id`` decides, so words written some other way
# are still answered right.
WORDS_READ_WHOLE_UP_TO = 2000
_FIRST_WORD, _LAST_WORD = map_word_ids_sql("maps.id")
_WORD_ON_THIS_MAP = (
    "CASE WHEN (SELECT rowid FROM map_words_fts WHERE map_words_fts MATCH :{name} LIMIT 1 OFFSET {whole}) IS NULL"
    " THEN " + _WORD_ON_MAP + " ELSE "
    "EXISTS (SELECT 1 FROM map_words_fts WHERE map_words_fts MATCH :{name}"
    " AND map_words_fts.rowid BETWEEN " + _FIRST_WORD + " AND " + _LAST_WORD +
    " AND " + word_map_sql("map_words_fts.rowid") + " = maps.id) END")


def words_condition(text: str, sql_params: dict, *, per_row: bool = False, counts: dict | None = None) -> str:
    """Maps that print every word of ``text`` (each anywhere on the map; case and accents folded),
    or all of them run together as one word (OCR often drops the space in "Cape Fear").
    ``per_row``: checked map by map (a condition on ``maps``, for a few candidate ids), not by
    reading every map that prints the words (what a whole-collection filter wants).  ``counts``
    (term -> matches, ``count_word_matches``): the whole-collection form reads the maps of the
    rarest term only and checks the others map by map; reading every map of each term would read
    every map printing "Cape" to find the few that also print a rare name."""
    terms = words_query_terms(text)
    if not terms:
        raise BadSearch("words: give a word printed on the maps to look for (letters or digits)")
    rarest = min(terms, key=lambda t: counts.get(t, 0)) if counts and len(terms) > 1 and not per_row else None
    parts = []
    for n, term in enumerate(terms, 1):
        sql_params[f"words_{n}"] = term
        on_map = _WORD_ON_THIS_MAP if per_row or (rarest is not None and term != rarest) else _WORD_ON_MAP
        parts.append(on_map.format(name=f"words_{n}", whole=int(WORDS_READ_WHOLE_UP_TO)))
    condition = " AND ".join(parts)
    joined = joined_term(text)
    if joined:
        sql_params["words_joined"] = joined
        on_map = _WORD_ON_THIS_MAP if per_row else _WORD_ON_MAP
        condition = f"(({condition}) OR {on_map.format(name='words_joined', whole=int(WORDS_READ_WHOLE_UP_TO))})"
    return condition


# How far a term's matches are counted to tell rarer from commoner terms (a bounded read of its
# FTS5 doclist, a few ms, cached per file state; FTS5 keeps no per-term counts): terms past it count
# as equally common.  A words filter whose rarest term is read fewer times searches the filter's maps
# at once (service._filtered_with_index): since word ids name their map that read is cheap, and a
# word read 20,000-60,000 times (3-10% of 562,842 maps) rarely put 10 of the 512 nearest maps through,
# so checking them first was wasted (bench/results/words.md, row b).
WORDS_COUNTED_UP_TO = 60_000


def count_word_matches(conn, terms: list[str], up_to: int = WORDS_COUNTED_UP_TO) -> dict[str, int]:
    """How many words read on the maps match each FTS5 term, counted up to ``up_to``."""
    return {term: conn.execute("SELECT count(*) FROM (SELECT 1 FROM map_words_fts WHERE map_words_fts MATCH ?"
                               " LIMIT ?)", (term, int(up_to))).fetchone()[0]
            for term in dict.fromkeys(terms)}


def words_were_read(conn) -> bool:
    """Whether OCR has read any map of this file (a ``words`` filter has something to find)."""
    return has_words(conn) and conn.execute("SELECT 1 FROM map_words_read LIMIT 1").fetchone() is not None


def matched_words_sql(text: str, map_ids: list[int], sql_params: dict) -> str:
    """The words read on these maps that match any word of ``text``: what a result shows."""
    terms = words_query_terms(text)
    joined = joined_term(text)
    sql_params["words_any"] = " OR ".join([*terms, *([joined] if joined else [])])
    sql_params["words_maps"] = "[" + ",".join(str(int(i)) for i in map_ids) + "]"
    # Map by map, each an FTS5 lookup bounded to the map's own word ids (see _WORD_ON_THIS_MAP):
    # never every match of a word printed on most maps.
    first, last = map_word_ids_sql("m.map_id")
    return ("SELECT w.map_id, w.text, w.id FROM (SELECT DISTINCT value AS map_id FROM json_each(:words_maps)) m\n"
            "CROSS JOIN map_words_fts f CROSS JOIN map_words w\n"
            "WHERE f.map_words_fts MATCH :words_any\n"
            f"  AND f.rowid BETWEEN {first} AND {last}\n"
            "  AND w.id = f.rowid AND w.map_id = m.map_id\n"
            "ORDER BY w.map_id, w.confidence DESC, w.id")


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


def matching_ids_sql(params: SearchParams, sql_params: dict, *, place_index: bool = False,
                     word_counts: dict | None = None) -> str:
    """Every id that passes the search's filters."""
    return "SELECT id FROM maps WHERE " + " AND ".join(
        filter_conditions(params, sql_params, place_index=place_index, word_counts=word_counts))


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
        expression = term_vector_sql(term, n, table, model_arg, sql_params)
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


def term_vector_sql(term: QueryTerm, n: int, table: str, model_arg: str, sql_params: dict) -> str:
    """One term's vector as SQL: the text through the model, a stored map's vector, an upload's."""
    if term.kind == "text":
        sql_params[f"text_{n}"] = term.value
        return f"mapclip_embed_text(:text_{n}{model_arg})"
    if term.kind == "map":
        sql_params[f"map_{n}"] = term.value
        return f"(SELECT embedding FROM [{table}] WHERE map_id = :map_{n})"
    if term.kind == "maps":  # marked maps: the direction of their mean
        name, ids = term.value
        parts = []
        for j, map_id in enumerate(ids, 1):
            sql_params[f"{name}_{j}"] = map_id
            parts.append(f"(SELECT embedding FROM [{table}] WHERE map_id = :{name}_{j}), 1")
        return "mapclip_combine(" + ", ".join(parts) + ")"
    sql_params[f"image_{n}"] = term.value.hex()
    return f"unhex(:image_{n})"


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


# -- fused rankings (``fusion=standardised|rrf``, ``rank=hybrid``) -----------------------------
#
# The service computes them in Python from each list's maps; the SQL below is what it shows, and
# running it gives the same order: every list is the same sqlite-vec KNN (or full-text query) with
# the same filters and depth, and the fused score the same arithmetic.

# The standardising sample: a fixed, spread-out choice of the collection's maps (ids scattered by
# a multiplicative hash by the golden ratio, so a collection loaded kind by kind is sampled evenly).
SAMPLE_SIZE = 1000
_SAMPLE_ORDER = "(rowid % 1000003) * 618034 % 1000003, rowid"
# Reciprocal rank fusion's constant: rank=hybrid keeps Cormack, Clarke & Buettcher's (2009) 60, tuned
# for fusing many full-text runs.  Fusing a query's own terms (fusion=rrf) uses 10: with 60 a map
# deep in both lists (place 30 in each) outscores the first of either, so at the slider's middle
# the maps both terms half-match crowd out each term's best; measured on the demo (every ordered
# pair of kinds, text + a map of another kind), both kinds had at least 4 of the top 12 in 90% of
# queries at 60, 99% at 20 and every one at 10 (bench/results/fusion.md).
RRF_K = 60
RRF_K_TERMS = 10
RRF_DEPTH = 1000  # how many maps of each list RRF reads: fixed, so every page ranks the same


def rrf_k(params: SearchParams) -> int:
    return RRF_K if params.rank == "hybrid" else RRF_K_TERMS


def sample_sql(vector_table: str) -> str:
    """The sample's ids and vectors (``:sample_size`` of them)."""
    return (f"SELECT s.id, (SELECT embedding FROM [{vector_table}] WHERE map_id = s.id) AS embedding\n"
            f"  FROM (SELECT rowid AS id FROM [{vector_table}_rowids] ORDER BY {_SAMPLE_ORDER}"
            " LIMIT :sample_size) s")


def vector_list_sql(vector_table: str, filters: str) -> str:
    """One vector's nearest maps (``:query_vector``, ``:depth`` of them) with the filters inside the KNN."""
    return (f"SELECT v.map_id AS id, 1 - v.distance * v.distance / 2 AS similarity FROM [{vector_table}] v\n"
            f"WHERE v.embedding MATCH :query_vector AND v.k = :depth{filters}\nORDER BY v.distance")


def _passing_filters(column: str, params: SearchParams, sql_params: dict, place_index: bool) -> str | None:
    """``column IN (the maps passing the filters)``, or None without filters."""
    conditions = filter_conditions(params, sql_params, place_index=place_index)
    return f"{column} IN (SELECT id FROM maps WHERE " + " AND ".join(conditions) + ")" if conditions else None


def _within_filters(column: str, params: SearchParams, sql_params: dict, place_index: bool,
                    indent: str = "      ") -> str:
    passing = _passing_filters(column, params, sql_params, place_index)
    return f"\n{indent}WHERE {passing}" if passing else ""


def fts_any(terms: list[str]) -> str:
    """Quoted FTS5 terms, any of them matching (bm25 ranks maps matching more of them first)."""
    return " OR ".join(terms)


def catalogue_terms(text: str) -> list[str]:
    """The quoted FTS5 terms of ``text`` that the catalogue's full-text list looks for: its first
    ``MAX_QUERY_TERMS`` different ones (each is counted before the search: the work stays bounded)."""
    return list(dict.fromkeys(t for t in fts_query(text).split(" ") if t))[:MAX_QUERY_TERMS]


def catalogue_list_sql(terms: list[str], params: SearchParams, sql_params: dict, *,
                       place_index: bool = False) -> str | None:
    """The catalogue's full-text ranking of ``terms`` (FTS5's ``rank``: bm25 over maps_fts, any of
    them), ``:depth`` maps, as (list, weight, map_id, pos) rows; None without a term.  The service
    leaves out terms found in more than half the records (``common_catalogue_terms``).  (``rank``,
    a column, where ``bm25()`` cannot be called from inside a subquery.)"""
    if not terms:
        return None
    sql_params["catalogue_text"] = fts_any(terms)
    within = _within_filters("id", params, sql_params, place_index)
    return ("SELECT 'catalogue' AS list, 1.0 AS weight, id AS map_id, pos FROM (\n"
            "    SELECT id, row_number() OVER (ORDER BY s, id) AS pos FROM (\n"
            "      SELECT rowid AS id, rank AS s FROM maps_fts WHERE maps_fts MATCH :catalogue_text)"
            f"{within}\n  ) WHERE pos <= :depth")


def common_catalogue_terms(conn, terms: list[str]) -> dict[str, bool]:
    """Whether each term is found in more than half the catalogue's records.  bm25 gives such a
    term no weight (FTS5 clamps its idf to 1e-6), yet ranking by it scores every record it matches:
    a second for "map" at Library of Congress scale.  Counted by reading at most half the records'
    entries of each term's doclist."""
    half = conn.execute("SELECT count(*) FROM maps").fetchone()[0] // 2
    return {term: conn.execute("SELECT count(*) FROM (SELECT 1 FROM maps_fts WHERE maps_fts MATCH ? LIMIT ?)",
                               (term, half + 1)).fetchone()[0] > half
            for term in dict.fromkeys(terms)}


def printed_terms(text: str) -> list[str]:
    """The quoted FTS5 terms of ``text`` the printed words' list looks for: each word, and all of
    them run together (OCR often drops the space in "Cape Fear")."""
    joined = joined_term(text)
    return list(dict.fromkeys([*words_query_terms(text), *([joined] if joined else [])]))


def rarest_first(counts: dict[str, int]) -> list[str]:
    """Terms by how many words read on the maps match them (``count_word_matches``), fewest first;
    terms counted alike (past the count's bound) in the query's order."""
    return sorted(counts, key=lambda term: counts[term])  # sorted() is stable: ties keep their order


def words_list_sql(terms: list[str], params: SearchParams, sql_params: dict, *,
                   place_index: bool = False) -> str | None:
    """The printed words' ranking: ``terms`` in the order given (rarest first, ``rarest_first``),
    each map by the first of them it prints, then by the first such word read (its id); ``:depth``
    maps, as (list, weight, map_id, pos) rows.  Every word read is a short label, so bm25 would rank
    them by the term's rarity all the same, but only after scoring every match: seconds for "river"
    on a million labels.  This order is read from the rarest term's matches on, and stops at
    ``:depth`` maps (``service._words_list``)."""
    if not terms:
        return None
    places = []
    for n, term in enumerate(terms, 1):
        sql_params[f"printed_{n}"] = term
        places.append(f"SELECT {n} AS n, :printed_{n} AS term")
    within = _within_filters("map_id", params, sql_params, place_index, indent="        ")
    # Each map's first term, and its first word of that term: min(n) picks the row that word_id
    # (a bare column) is read from, as SQLite documents for a lone min().
    return ("SELECT 'words' AS list, 1.0 AS weight, map_id, pos FROM (\n"
            "  SELECT map_id, row_number() OVER (ORDER BY n, word_id) AS pos FROM (\n"
            "    SELECT map_id, min(n) AS n, word_id FROM (\n"
            "      SELECT map_id, n, min(word_id) AS word_id FROM (\n"
            f"        SELECT t.n, f.rowid AS word_id, {word_map_sql('f.rowid')} AS map_id\n"
            "        FROM (" + " UNION ALL ".join(places) + ") t\n"
            f"        JOIN map_words_fts f ON f.map_words_fts MATCH t.term){within}\n"
            "      GROUP BY map_id, n)\n"
            "    GROUP BY map_id)\n"
            "  ) WHERE pos <= :depth")


def words_list_stream_sql(params: SearchParams, sql_params: dict, *, place_index: bool = False) -> str:
    """One term's matches, as the words list reads them: each word's map, in word id order
    (``:term``; FTS5 returns rowids in order, so nothing is sorted)."""
    passing = _passing_filters("map_id", params, sql_params, place_index)
    return (f"SELECT map_id FROM (SELECT f.rowid AS word_id, {word_map_sql('f.rowid')} AS map_id\n"
            "  FROM map_words_fts f WHERE f.map_words_fts MATCH :term)" + (f"\nWHERE {passing}" if passing else "")
            + "\nORDER BY word_id")


@dataclasses.dataclass
class FusedPlan:
    """The shown SQL of a fused ranking and its parameters."""

    sql: str
    params: dict


def _terms_cte(terms: list[QueryTerm], params: SearchParams, table: str, sql_params: dict) -> str:
    model_arg = ", :model" if params.model else ""
    if params.model:
        sql_params["model"] = params.model
    rows = []
    for n, term in enumerate(terms, 1):
        sql_params[f"weight_{n}"] = term.weight
        rows.append(f"({n}, CAST(:weight_{n} AS REAL), {term_vector_sql(term, n, table, model_arg, sql_params)})")
    return "terms(n, weight, vector) AS MATERIALIZED (\n  VALUES " + ",\n         ".join(rows) + "\n)"


def _knn(table: str, vector: str, filters: str, columns: str) -> str:
    return (f"SELECT {columns} FROM [{table}] v\n    WHERE v.embedding MATCH {vector} AND v.k = :depth"
            + filters.replace("\n", "\n  "))


def _term_vector(n: int) -> str:
    return f"(SELECT vector FROM terms WHERE n = {n})"


def _fused_select(extra: str = "") -> str:
    return (f"SELECT\n  {RESULT_COLUMNS},\n  fused.score AS similarity{extra}\nFROM fused JOIN maps ON maps.id = fused.map_id\n"
            "ORDER BY fused.score DESC, maps.id\nLIMIT :limit OFFSET :offset")


def _paging(params: SearchParams) -> dict:
    return {"limit": params.k, "offset": params.k * (params.page - 1)}


def standardised_plan(params: SearchParams, model: dict, terms: list[QueryTerm], depth: int, *,
                      place_index: bool = False) -> FusedPlan:
    """Each term's similarity standardised by its mean and deviation over the sample, summed by
    weight, over the union of every term's ``depth`` nearest maps (a negative term's: farthest)."""
    table = model.vector_table
    sql_params: dict = {}
    cte = _terms_cte(terms, params, table, sql_params)
    filters = filter_clause(params, sql_params, place_index=place_index)
    lists = "\n  UNION\n  ".join(
        _knn(table, _term_vector(n) if term.weight > 0 else f"mapclip_combine({_term_vector(n)}, -1)", filters,
             "v.map_id") for n, term in enumerate(terms, 1))
    sql = f"""WITH {cte},
sample AS MATERIALIZED (
  {sample_sql(table)}
),
stats AS MATERIALIZED (
  SELECT n, avg(s) AS mean, max(sqrt(max(avg(s * s) - avg(s) * avg(s), 0)), 1e-9) AS sd
  FROM (SELECT terms.n, mapclip_similarity(sample.embedding, terms.vector) AS s FROM terms, sample)
  GROUP BY n
),
candidates AS (
  {lists}
),
fused AS (
  SELECT c.map_id, sum(terms.weight * (mapclip_similarity(
      (SELECT embedding FROM [{table}] WHERE map_id = c.map_id), terms.vector) - stats.mean) / stats.sd) AS score
  FROM candidates c, terms JOIN stats ON stats.n = terms.n
  GROUP BY c.map_id
)
{_fused_select()}"""
    return FusedPlan(sql, {**sql_params, "sample_size": SAMPLE_SIZE, "depth": depth, **_paging(params)})


def rrf_plan(params: SearchParams, model: dict, terms: list[QueryTerm] | None, *,
             catalogue_terms: list[str] | None = None, printed_terms: list[str] | None = None,
             place_index: bool = False) -> FusedPlan:
    """Reciprocal rank fusion: each list's maps score weight / (``:rrf_k`` + their place in it),
    summed; a map in no list of positive weight is left out.  ``terms``: one vector list each
    ("term 1", ...), or None for one list of the query's combined vector ("clip");
    ``catalogue_terms`` and ``printed_terms`` (rarest first): the full-text lists of ``rank=hybrid``."""
    table = model.vector_table
    sql_params: dict = {}
    if terms is None:
        cte = ("terms(n, weight, vector) AS MATERIALIZED (\n  VALUES (1, 1.0, "
               f"{query_vector_sql(params, model, sql_params)})\n)")
        count = 1
    else:
        cte = _terms_cte(terms, params, table, sql_params)
        count = len(terms)
    filters = filter_clause(params, sql_params, place_index=place_index)
    lists = [_knn(table, _term_vector(n), filters,
                  f"'{vector_list_name(n, count)}' AS list, (SELECT weight FROM terms WHERE n = {n}) AS weight, "
                  "v.map_id, row_number() OVER (ORDER BY v.distance) AS pos")
             for n in range(1, count + 1)]
    if catalogue_terms and (piece := catalogue_list_sql(catalogue_terms, params, sql_params, place_index=place_index)):
        lists.append(piece)
    if printed_terms and (piece := words_list_sql(printed_terms, params, sql_params, place_index=place_index)):
        lists.append(piece)
    joined = "\n  UNION ALL\n  ".join(lists)
    sql = f"""WITH {cte},
lists AS (
  {joined}
),
fused AS (
  SELECT map_id, round(sum(weight / (:rrf_k + pos)), 12) AS score, json_group_object(list, pos) AS ranks
  FROM lists GROUP BY map_id HAVING max(weight) > 0
)
{_fused_select(", fused.ranks")}"""
    return FusedPlan(sql, {**sql_params, "rrf_k": rrf_k(params), "depth": RRF_DEPTH, **_paging(params)})


def vector_list_name(n: int, count: int) -> str:
    return "clip" if count == 1 else f"term {n}"
