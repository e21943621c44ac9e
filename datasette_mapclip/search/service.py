"""The search service: the one answer to "run this search", for the web pages, the CLI and Python.

    collection (which database, which model)
      -> query vector (text through the model, an uploaded image's vector, a stored map's vector)
      -> nearest maps (the in-memory index when it is ready and no filter applies, else sqlite-vec)
      -> results with links

It needs no Datasette object: a ``SearchCollection`` is a database handle (anything with Datasette's async
``execute`` and ``execute_fn``: a Datasette ``Database`` or ``local.FileDatabase``), the models read
from it, the settings, the resources that run the work (``resources.SearchResources``) and the
``Links`` its answers carry.  The web layer (web/collections.py) checks permissions and builds one
per request; ``local.py`` builds one for a file.

Model work (encoding text or an uploaded image) runs in the resources' one model thread and index
scans in another (workers.py), never on the event loop and never inside a database thread, so a
"more like this" or a stored-vector search never waits behind text encoding.  Every failure
leaves here as an ``errors.SearchError`` with its status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Protocol

import numpy as np

from .. import store
from ..model import iiif
from ..model.clip import ModelUnavailable
from ..model.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_query_image
from ..settings import Settings, settings_of
from ..store import vectors
from ..store.records import display_row
from ..store.words import words_query_terms
from . import citations, query_vector
from . import sql as search_sql
from .errors import BadSearch, NotFound, SearchUnavailable, UploadError
from .links import web_url
from .query import VEC0_MAX_K, SearchParams
from .resources import SearchResources

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A statement cut by the time limit of whoever runs the database (a Datasette server's
    ``sql_time_limit_ms``); database adapters raise it so the service can answer 503."""


class Links(Protocol):
    """The URLs an answer carries.  A server has pages for a map, its stored thumbnail, its row and
    the search's SQL; a file searched from Python or the command line has none (each method None)."""

    def thumbnail(self, map_id: int) -> str | None: ...
    def map(self, map_id: int) -> str | None: ...
    def record(self, map_id: int) -> str | None: ...
    def sql(self, sql: str, params: dict) -> str | None: ...
    def next_page(self, params: SearchParams) -> str | None: ...


class NoLinks:
    """Links for a file with no server in front of it."""

    def thumbnail(self, map_id):
        return None

    def map(self, map_id):
        return None

    def record(self, map_id):
        return None

    def sql(self, sql, params):
        return None

    def next_page(self, params):
        return None


async def _run_in(executor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


@dataclasses.dataclass
class SearchCollection:
    """One database holding maps, and the model a search of it uses."""

    name: str
    db: object  # async execute(sql, params) and execute_fn(fn), as Datasette's Database has
    path: str | None  # the file (the in-memory index keys its cache by it); None in memory
    models: list[dict]
    model: dict
    config: Settings
    resources: SearchResources
    links: Links = dataclasses.field(default_factory=NoLinks)
    time_limit_ms: int | None = None

    @property
    def workers(self):
        return self.resources.workers

    def encoder(self):
        """The shared encoder of this collection's model (ModelUnavailable if it cannot be had)."""
        stored = store.StoredQueryEncoders(self.path, self.model.name) if self.path else None
        return self.resources.encoders.get(self.model, self.config, stored=stored)

    def index(self, wait_early: bool = False):
        """The in-memory index of this model's vectors, or None while it is built (or off).
        ``wait_early``: see ``IndexRegistry.for_model`` (blocks: call it in a thread)."""
        return self.resources.indexes.for_model(self.path, self.model, self.config, wait_early=wait_early)


async def open_collection(name: str, db, path: str | None, config: Settings, resources: SearchResources, *,
                          model_name: str | None = None, links: Links | None = None,
                          time_limit_ms: int | None = None) -> SearchCollection:
    """A collection with its models read and one chosen (``store.ModelNotFound`` if none fits).
    Permissions are the caller's: the web layer checks them before it calls this."""
    try:
        models = await db.execute_fn(store.read_models)
        model = store.pick_model(models, model_name)
    except store.ModelNotFound:
        raise
    except Exception as error:
        if cut := unavailable_if_interrupted(error, time_limit_ms):
            raise cut from None
        # The file's own rows are at fault (written by hand or by a broken tool), not the request.
        raise SearchUnavailable(f"collection {name!r} cannot be searched: its models table cannot be read "
                                f"({type(error).__name__}: {error})") from None
    return SearchCollection(name, db, path, models, model, config, resources, links or NoLinks(), time_limit_ms)


def preload_model(collection: SearchCollection):
    """Load the collection's model in the model thread now (server start-up), not at the first text
    search; a model that cannot be loaded is reported when a search needs it.  Returns the future."""
    def load():
        try:
            collection.encoder()
        except ModelUnavailable as error:
            log.warning("mapclip: the model of %s could not be loaded at start-up: %s", collection.name, error)

    return collection.workers.model.submit(load)


def start_up(collection: SearchCollection, preload: bool):
    """A served collection's start: its index built or read back in the background and, with
    ``preload``, its model loaded meanwhile; the index's codes load after the model when a restart's
    cached vectors can answer exactly until then (``LiveIndex.defer_codes_until``)."""
    if preload and collection.path and settings_of(collection.config).index != "off":
        live = collection.resources.indexes.live_for(collection.path, collection.model, collection.config)
        live.defer_codes_until(preload_model(collection))
        collection.index()
    else:
        collection.index()
        if preload:
            preload_model(collection)


def unavailable_if_interrupted(error: Exception, time_limit_ms: int | None) -> SearchUnavailable | None:
    """A statement cut by the time limit (an adapter's ``Interrupted``, or SQLite's own
    SQLITE_INTERRUPT code, wherever it surfaces) -> the 503 that says so."""
    if isinstance(error, Interrupted) or getattr(error, "sqlite_errorcode", None) == store.SQLITE_INTERRUPT:
        return SearchUnavailable(too_slow_message(time_limit_ms))
    return None


def cut_by_time_limit(error: Exception, seconds: float, time_limit_ms: int | None) -> bool:
    """Whether a statement that failed after ``seconds`` was cut by the time limit: SQLite says
    "interrupted", except inside a sqlite-vec scan, which reports its interrupted chunk read as
    "chunks iter error" (SQLITE_ERROR), so that message counts only once the limit has passed."""
    message = str(error)
    if "interrupted" in message:
        return True
    return bool(time_limit_ms) and "chunks iter error" in message and seconds * 1000 >= time_limit_ms


def too_slow_message(time_limit_ms: int | None) -> str:
    limit = f"this server's {time_limit_ms} ms" if time_limit_ms else "the time"
    return (f"the search took longer than {limit} limit: narrow it with filters, "
            "or ask the publisher to raise sql_time_limit_ms")


def check_vector(params: SearchParams, model: dict):
    given = [("vector", params.vector)] if params.vector is not None else []
    given += [(f"image term {i + 1}", t.value) for i, t in enumerate(t for t in params.terms if t.kind == "image")]
    for name, blob in given:
        if len(blob) != 4 * model.dim:
            raise BadSearch(f"{name} has {len(blob) // 4} floats; model {model['name']} uses {model['dim']}")
        if not np.isfinite(vectors.decode(blob)).all():
            raise BadSearch(f"{name} contains NaN or infinite values")


async def build_query_vector(collection: SearchCollection, params: SearchParams, index=None) -> np.ndarray:
    """The one query vector of a search, whichever path then runs it: every term (text, stored map,
    uploaded image) weighted and combined, then moved by any relevance feedback."""
    terms = params.all_terms()
    stored_ids = [t.value for t in terms if t.kind == "map"] + list(params.more) + list(params.fewer)
    stored = await _stored_vectors(collection, stored_ids, index) if stored_ids else {}
    try:
        texts = [t.value for t in terms if t.kind == "text"]
        found = iter(await asyncio.gather(*(collection.workers.text.vector(collection, text) for text in texts)))
        weighted = []
        for term in terms:
            vector = (next(found) if term.kind == "text" else stored[term.value] if term.kind == "map"
                      else vectors.decode(term.value))
            weighted.append((vector, term.weight))
        return query_vector.with_feedback(weighted, [stored[i] for i in params.more],
                                          [stored[i] for i in params.fewer])
    except ModelUnavailable as error:
        raise SearchUnavailable(str(error)) from None
    except ValueError as error:  # the weighted terms cancel out
        raise BadSearch(str(error)) from None


async def _stored_vectors(collection: SearchCollection, map_ids: list[int], index=None) -> dict[int, np.ndarray]:
    """Stored maps' vectors by id, from the index where it holds them (no SQLite read), else the file."""
    found = {}
    if index is not None:
        found = await _run_in(collection.workers.index,
                              lambda: {i: v for i in set(map_ids) if (v := index.vector_of(i)) is not None})
    missing = [i for i in dict.fromkeys(map_ids) if i not in found]
    if missing:
        read = await collection.db.execute_fn(
            lambda conn: {i: v for i in missing if (v := store.read_stored_vector(conn, collection.model, i)) is not None})
        found.update(read)
    for map_id in dict.fromkeys(map_ids):
        if map_id not in found:
            raise NotFound(f"map {map_id} has no vector for model {collection.model['name']} in this collection")
    return found


async def _nearest_with_index(collection: SearchCollection, index, query: np.ndarray, params: SearchParams,
                              place_index: bool = False) -> list[dict]:
    need = min(params.k * params.page + 1, VEC0_MAX_K)  # one more than the page: is there a next page?
    way = None
    if params.has_filters:
        ids, scores, way = await _filtered_with_index(collection, index, query, params, need, place_index)
    else:
        ids, scores = await _run_in(collection.workers.index, index.search, query, need)
    skip = params.k * (params.page - 1)
    ids, scores = ids[skip:], scores[skip:]
    rows = await collection.db.execute_fn(
        lambda conn: store.read_result_rows(conn, ids))
    return [{**rows[int(i)], "similarity": float(s)} for i, s in zip(ids, scores) if int(i) in rows], way


async def _filtered_with_index(collection: SearchCollection, index, query: np.ndarray, params: SearchParams, need: int,
                               place_index: bool = False):
    """A filtered search, chosen by selectivity: the nearest maps of the whole collection are checked
    against the filter first (a broad filter keeps enough of them); when too few pass, every map the
    filter selects is searched (``VectorIndex.search_among``).  The filters are the same SQL conditions
    the reported sqlite-vec query applies, so both answer the same maps."""
    terms = words_query_terms(params.words) if params.words else []
    counts = await collection.db.execute_fn(lambda conn: _word_counts(collection, conn, terms)) if terms else None
    if counts and min(counts.values()) < search_sql.WORDS_COUNTED_UP_TO:
        # Printed on few maps (its rarest word read fewer than WORDS_COUNTED_UP_TO times): reading
        # the filter's maps costs less than checking candidates map by map, and few would pass.
        return await _search_filters_maps(collection, index, query, params, need, place_index, counts)
    pool = max(settings_of(collection.config).filter_pool, 4 * need)
    ids, scores = await _run_in(collection.workers.index, index.search, query, pool)
    # The nearest few first: a broad filter passes enough of them, and each check costs (a
    # full-text condition ~30 us per map); the rest of the pool only when too few passed.
    passing: set = set()
    keep = np.zeros(len(ids), bool)
    for part in (ids[:4 * need], ids[4 * need:]):
        if not len(part):
            continue
        sql_params = {"ids": "[" + ",".join(str(int(i)) for i in part) + "]"}
        passing |= {row[0] for row in await _filter_sql(
            collection, search_sql.passing_ids_sql(params, sql_params), sql_params)}
        keep = np.fromiter((int(i) in passing for i in ids), bool, len(ids))
        if keep.sum() >= need:
            return ids[keep][:need], scores[keep][:need], "nearest maps filtered"
    if len(ids) == len(index):
        return ids[keep][:need], scores[keep][:need], "nearest maps filtered"
    return await _search_filters_maps(collection, index, query, params, need, place_index, counts)


async def _search_filters_maps(collection: SearchCollection, index, query: np.ndarray, params: SearchParams,
                               need: int, place_index: bool, word_counts: dict | None):
    """Every map the filters select, searched (``VectorIndex.search_among``)."""
    sql_params: dict = {}
    allowed = np.fromiter((row[0] for row in await _filter_sql(
        collection, search_sql.matching_ids_sql(params, sql_params, place_index=place_index, word_counts=word_counts),
        sql_params)), np.int64)
    exact_up_to = settings_of(collection.config).exact_subset_rows
    ids, scores = await _run_in(collection.workers.index, index.search_among, query, need, allowed, exact_up_to)
    way = "filter's maps scored exactly" if index.exact or len(allowed) <= exact_up_to else "filter's maps scanned"
    return ids, scores, way


def _word_counts(collection: SearchCollection, conn, terms: list[str]) -> dict | None:
    """How common each ``words`` term is (None when they cannot be counted: the filter's own SQL
    then says what is wrong)."""
    try:
        return _counted(collection, _file_stamp(collection.path), conn, "words", terms, search_sql.count_word_matches)
    except Exception as error:
        log.info("mapclip: words could not be counted: %s", error)
        return None


async def _filter_sql(collection: SearchCollection, sql: str, sql_params: dict):
    """Run a filter's SQL within the database's time limit (its own 503 when cut)."""
    try:
        return await collection.db.execute(sql, sql_params, log_sql_errors=False)
    except Exception as error:
        if cut := unavailable_if_interrupted(error, collection.time_limit_ms):
            raise cut from None
        raise BadSearch(f"the filter could not run: {error}") from None


async def _attach_matched_words(collection: SearchCollection, text: str, results: list[dict],
                                per_map: int = 8) -> None:
    """Each result's words that match the ``words`` filter (as read on the map), at most ``per_map``."""
    sql_params: dict = {}
    sql = search_sql.matched_words_sql(text, [r["id"] for r in results], sql_params)
    found: dict[int, list[str]] = {}
    first: dict[int, int] = {}
    for row in await _filter_sql(collection, sql, sql_params):
        texts = found.setdefault(row[0], [])
        first.setdefault(row[0], row[2])
        if len(texts) < per_map and row[1] not in texts:
            texts.append(row[1])
    for result in results:
        result["words"] = found.get(result["id"], [])
        if result["id"] in first and result.get("map_url"):  # the map's page, zoomed to the word
            result["map_url"] = f"{result['map_url']}?word={first[result['id']]}"


async def _nearest_with_sqlite_vec(collection: SearchCollection, plan: search_sql.SearchPlan, query: np.ndarray) -> list[dict]:
    try:
        rows = await collection.db.execute(plan.run_sql, {**plan.run_params, "query_vector": vectors.encode(query)},
                                           log_sql_errors=False)
    except Exception as error:  # sqlite errors: typed by SQLite's own error code
        if cut := unavailable_if_interrupted(error, collection.time_limit_ms):
            raise cut from None
        log.warning("mapclip: search SQL failed: %s", error)
        raise BadSearch(f"the search could not run: {error}") from None
    return [display_row(dict(row)) for row in rows]


# -- fused rankings (``fusion=standardised|rrf``, ``rank=hybrid``) ------------------------------

FUSION_START_DEPTH = 64  # each term's first list; deepened (x4) until the page is certain


async def _term_vectors(collection: SearchCollection, terms, index=None) -> np.ndarray:
    """Each term's unit vector, one row each."""
    stored_ids = [t.value for t in terms if t.kind == "map"] + [i for t in terms if t.kind == "maps" for i in t.value[1]]
    stored = await _stored_vectors(collection, stored_ids, index) if stored_ids else {}
    texts = [t.value for t in terms if t.kind == "text"]
    try:
        found = iter(await asyncio.gather(*(collection.workers.text.vector(collection, text) for text in texts)))
    except ModelUnavailable as error:
        raise SearchUnavailable(str(error)) from None
    rows = [next(found) if t.kind == "text" else stored[t.value] if t.kind == "map"
            else np.sum([stored[i] for i in t.value[1]], axis=0) if t.kind == "maps" else vectors.decode(t.value)
            for t in terms]
    for n, row in enumerate(rows, 1):
        if not np.any(row):
            raise BadSearch(f"term {n} of the query has a zero vector: it has no direction to rank by")
    return np.stack([vectors.normalise(np.asarray(row, np.float32)) for row in rows]).astype(np.float32)


async def _sql(collection: SearchCollection, sql: str, sql_params: dict, what: str):
    try:
        return await collection.db.execute(sql, sql_params, log_sql_errors=False)
    except Exception as error:
        if cut := unavailable_if_interrupted(error, collection.time_limit_ms):
            raise cut from None
        log.warning("mapclip: %s SQL failed: %s", what, error)
        raise BadSearch(f"the {what} could not run: {error}") from None


async def _vector_list(collection: SearchCollection, index, vector: np.ndarray, params: SearchParams, depth: int,
                       place_index: bool) -> tuple[np.ndarray, np.ndarray]:
    """A vector's ``depth`` nearest maps that pass the filters -> (ids, similarities), best first:
    from the in-memory index where it is ready, else the sqlite-vec KNN the shown SQL runs."""
    if index is not None:
        if params.has_filters:
            ids, scores, _ = await _filtered_with_index(collection, index, vector, params, depth, place_index)
        else:
            ids, scores = await _run_in(collection.workers.index, index.search, vector, depth)
        return np.asarray(ids, np.int64), np.asarray(scores, np.float64)
    sql_params: dict = {}
    filters = search_sql.filter_clause(params, sql_params, place_index=place_index)
    rows = await _sql(collection, search_sql.vector_list_sql(collection.model.vector_table, filters),
                      {**sql_params, "query_vector": vectors.encode(vector), "depth": depth}, "search")
    return np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.float64)


async def _sample_vectors(collection: SearchCollection) -> np.ndarray:
    """The standardising sample (search_sql.sample_sql), kept while the collection's vectors stay."""
    table = collection.model.vector_table
    largest = await collection.db.execute_fn(lambda conn: store.read_vector_max_id(conn, table))
    key = (collection.path, table, largest)
    samples = collection.resources.fusion_samples
    if collection.path and key in samples:
        return samples[key]
    rows = await _sql(collection, search_sql.sample_sql(table), {"sample_size": search_sql.SAMPLE_SIZE},
                      "standardising sample")
    found = [vectors.decode(r[1]) for r in rows if r[1] is not None]
    matrix = np.stack(found).astype(np.float32) if found else np.zeros((0, collection.model.dim), np.float32)
    if collection.path:
        if len(samples) > 16:
            samples.clear()
        samples[key] = matrix
    return matrix


async def _standardised(collection: SearchCollection, index, params: SearchParams, place_index: bool):
    """(ranked [(id, score)], the depth the lists reached): exact over every map passing the filters
    whenever the threshold certifies the page, which the lists are deepened until it does."""
    terms = params.fused_terms()
    queries = await _term_vectors(collection, terms, index)
    weights = np.array([t.weight for t in terms], np.float64)
    signs = np.sign(weights)
    sample = await _sample_vectors(collection)
    if not len(sample):  # no map has a vector yet
        return [], FUSION_START_DEPTH
    mean, deviation = query_vector.term_stats(sample, queries)
    need = min(params.k * params.page + 1, VEC0_MAX_K)
    depth = min(FUSION_START_DEPTH, VEC0_MAX_K)
    scores: dict[int, float] = {}
    while True:
        lists = [await _vector_list(collection, index, (signs[i] * queries[i]).astype(np.float32), params, depth,
                                    place_index) for i in range(len(terms))]
        new = [int(i) for i in dict.fromkeys(np.concatenate([ids for ids, _ in lists]).tolist()) if int(i) not in scores]
        found = await _stored_vectors(collection, new, index) if new else {}

        def score_and_rank():  # thousands of candidates at a deep page: off the event loop
            if new:
                matrix = np.stack([found[i] for i in new]).astype(np.float32)
                scores.update(zip(new, query_vector.standardised_scores(matrix, queries, weights, mean,
                                                                        deviation).tolist()))
            return sorted(scores.items(), key=lambda item: (-item[1], item[0]))

        ranked = await _run_in(collection.workers.index, score_and_rank)
        complete = any(len(ids) < depth for ids, _ in lists)  # a list holds every map passing the filters
        if complete or depth >= VEC0_MAX_K:
            return ranked, depth
        bound = query_vector.standardised_bound(np.array([sims[-1] for _, sims in lists]), weights, mean, deviation)
        if len(ranked) >= need and ranked[need - 1][1] >= bound:
            return ranked, depth
        depth = min(depth * 4, VEC0_MAX_K)


async def _rrf(collection: SearchCollection, index, params: SearchParams, place_index: bool, *,
               combined: bool, catalogue_terms: list[str] | None = None, printed_terms: list[str] | None = None):
    """Reciprocal rank fusion of the vector lists (the combined query's, or each term's) and, for
    ``rank=hybrid``, the full-text lists: ranked [(id, (score, ranks))]."""
    depth = search_sql.RRF_DEPTH
    if combined:
        query = await build_query_vector(collection, params, index)
        named = [("clip", 1.0, query)]
    else:
        terms = params.fused_terms()
        queries = await _term_vectors(collection, terms, index)
        total = sum(abs(t.weight) for t in terms) if params.rank == "hybrid" else 1.0
        named = [(search_sql.vector_list_name(n, len(terms)), t.weight / total, queries[n - 1])
                 for n, t in enumerate(terms, 1)]
    lists = []
    for name, weight, vector in named:
        ids, _ = await _vector_list(collection, index, vector, params, depth, place_index)
        lists.append((name, weight, ids.tolist()))
    sql_params: dict = {}
    if catalogue_terms and (sql := search_sql.catalogue_list_sql(catalogue_terms, params, sql_params,
                                                                  place_index=place_index)):
        rows = await _sql(collection, f"SELECT map_id FROM ({sql}) ORDER BY pos", {**sql_params, "depth": depth},
                          "full-text ranking")
        lists.append(("catalogue", 1.0, [r[0] for r in rows]))
    if printed_terms:
        lists.append(("words", 1.0, await _words_list(collection, params, printed_terms, depth, place_index)))

    def fuse():
        fused = query_vector.rrf_scores(lists, search_sql.rrf_k(params))
        return sorted(fused.items(), key=lambda item: (-item[1][0], item[0]))

    return await _run_in(collection.workers.index, fuse)


async def _words_list(collection: SearchCollection, params: SearchParams, terms: list[str], depth: int,
                      place_index: bool) -> list[int]:
    """The printed words' list (``search_sql.words_list_sql``): each term's matches read in word
    order, rarest term first, each map kept where it first appears, until ``depth`` maps; within
    the server's time limit (a 503 past it)."""
    sql_params: dict = {}
    sql = search_sql.words_list_stream_sql(params, sql_params, place_index=place_index)
    limit = collection.time_limit_ms

    def read(conn) -> list[int]:
        started = time.monotonic()
        if limit:
            conn.set_progress_handler(lambda: int(time.monotonic() > started + limit / 1000), 1000)
        found: dict[int, None] = {}
        try:
            for term in terms:
                for (map_id,) in conn.execute(sql, {**sql_params, "term": term}):
                    found.setdefault(map_id)
                    if len(found) >= depth:
                        return list(found)
            return list(found)
        except Exception as error:
            if cut_by_time_limit(error, time.monotonic() - started, limit):
                raise Interrupted(str(error)) from None
            raise
        finally:
            if limit:
                conn.set_progress_handler(None, 0)

    try:
        return await collection.db.execute_fn(read)
    except Exception as error:
        if cut := unavailable_if_interrupted(error, collection.time_limit_ms):
            raise cut from None
        log.warning("mapclip: printed words' ranking failed: %s", error)
        raise BadSearch(f"the full-text ranking could not run: {error}") from None


async def _full_text_terms(collection: SearchCollection, text: str, catalogue: bool, words: bool):
    """(the catalogue terms ranked by, the printed terms rarest first) of a hybrid search's text.
    Catalogue terms in more than half the records are left out (``common_catalogue_terms``); the
    counts are kept while the file stays as it was."""
    catalogue_terms = search_sql.catalogue_terms(text) if catalogue else []
    printed = search_sql.printed_terms(text) if words else []

    def plan(conn):
        stamp = _file_stamp(collection.path)
        common = (_counted(collection, stamp, conn, "common", catalogue_terms, search_sql.common_catalogue_terms)
                  if catalogue_terms else {})
        ordered = (search_sql.rarest_first(_counted(collection, stamp, conn, "words", printed,
                                                    search_sql.count_word_matches)) if printed else [])
        return [t for t in catalogue_terms if not common[t]], ordered

    try:
        return await collection.db.execute_fn(plan)
    except Exception as error:
        log.warning("mapclip: full-text terms could not be counted: %s", error)
        raise BadSearch(f"the full-text ranking could not run: {error}") from None


def _counted(collection: SearchCollection, stamp, conn, kind: str, terms: list[str], count) -> dict:
    """term -> ``count(conn, terms)[term]``, each term's kept in ``resources.full_text_counts`` while
    the file stays as it was (``stamp``, ``_file_stamp``; None: nothing kept)."""
    counts = collection.resources.full_text_counts
    known = {t: counts.get((collection.path, stamp, kind, t)) for t in terms} if stamp is not None else {}
    missing = [t for t in terms if known.get(t) is None]
    if missing:
        known.update(count(conn, missing))
        if stamp is not None:
            if len(counts) > 4096:
                counts.clear()
            counts.update({(collection.path, stamp, kind, t): known[t] for t in missing})
    return {t: known[t] for t in terms}


def _file_stamp(path: str | None):
    """What changes when the file (or its write-ahead log) is written; None: no file to watch."""
    if not path:
        return None
    try:
        main = os.stat(path)
    except OSError:
        return None
    try:
        wal = os.stat(path + "-wal")
        log_stamp = (wal.st_mtime_ns, wal.st_size)
    except OSError:
        log_stamp = None
    return main.st_mtime_ns, main.st_size, log_stamp


async def _fused_search(collection: SearchCollection, params: SearchParams, index, place_index: bool,
                        text_indexes: frozenset):
    """(rows, shown plan, how it was searched) of a fused ranking."""
    model = collection.model
    if params.rank == "hybrid":
        text = params.hybrid_text()
        if not text:
            raise BadSearch("rank=hybrid fuses the CLIP ranking with the full-text rankings of the query's words: "
                            "give a text (q) to look for")
        catalogue = "maps_fts" in text_indexes
        words = await collection.db.execute_fn(search_sql.words_were_read)
        catalogue_terms, printed = await _full_text_terms(collection, text, catalogue, words)
        combined = not params.is_fused
        terms = None if combined else _hybrid_terms(params)
        ranked = await _rrf(collection, index, params, place_index, combined=combined,
                            catalogue_terms=catalogue_terms, printed_terms=printed)
        shown = search_sql.rrf_plan(params, model, terms, catalogue_terms=catalogue_terms, printed_terms=printed,
                                    place_index=place_index)
        lists = ["CLIP"] + (["catalogue"] if catalogue_terms else []) + (["printed words"] if printed else [])
        way = "hybrid: reciprocal rank fusion of " + ", ".join(lists)
        if catalogue and not catalogue_terms and search_sql.catalogue_terms(text):
            way += " (the catalogue's: every word of the text is in more than half the records)"
    elif params.fusion == "rrf":
        ranked = await _rrf(collection, index, params, place_index, combined=False)
        shown = search_sql.rrf_plan(params, model, params.fused_terms(), place_index=place_index)
        way = "reciprocal rank fusion of the terms"
    else:
        ranked, depth = await _standardised(collection, index, params, place_index)
        ranked = [(i, (score, None)) for i, score in ranked]
        shown = search_sql.standardised_plan(params, model, params.fused_terms(), depth, place_index=place_index)
        way = "standardised fusion of the terms"
    skip = params.k * (params.page - 1)
    page = ranked[skip:skip + params.k + 1]
    found = await collection.db.execute_fn(lambda conn: store.read_result_rows(conn, [i for i, _ in page]))
    rows = []
    for map_id, (score, ranks) in page:
        if map_id in found:
            rows.append({**found[map_id], "similarity": score, **({"ranks": ranks} if ranks is not None else {})})
    return rows, shown, way


def _hybrid_terms(params: SearchParams):
    """The terms of a hybrid search's per-term lists, sharing a weight of 1 (each full-text list has 1)."""
    terms = params.fused_terms()
    total = sum(abs(t.weight) for t in terms)
    return [dataclasses.replace(t, weight=t.weight / total) for t in terms]


async def run_search(collection: SearchCollection, params: SearchParams) -> dict:
    """Run one search; the answer is what ``search.json`` returns (the page and the CLI show the same)."""
    model = collection.model
    check_vector(params, model)
    fused = params.rank == "hybrid" or params.is_fused
    text_indexes = (await collection.db.execute_fn(store.text_indexes) if params.has_filters or fused
                    else frozenset())
    if params.filter and "maps_fts" not in text_indexes:
        raise BadSearch("this collection has no full-text index (maps_fts), so filter cannot be used")
    if params.words and not await collection.db.execute_fn(search_sql.words_were_read):
        raise BadSearch("no words have been read from this collection's maps yet, so words cannot be used "
                        "(the publisher can read them with: mapclip ocr)")
    place_index = "maps_place" in text_indexes
    plan = search_sql.plan(params, model, place_index=place_index)
    index = await asyncio.to_thread(collection.index, True)  # it may read SQLite: never on the event loop
    behind = bool(getattr(index, "behind", False))
    # a map the index does not hold yet (just added) is read from the database
    if fused:
        rows, shown, way = await _fused_search(collection, params, index if not behind else None, place_index,
                                               text_indexes)
        searched_with = ("in-memory" if index is not None and not behind else "sqlite-vec") + f" ({way})"
        plan = search_sql.SearchPlan(shown.sql, shown.params, "", {})
    elif index is not None:
        query = await build_query_vector(collection, params, index if not behind else None)
        rows, way = await _nearest_with_index(collection, index, query, params, place_index)
        # filtered searches scan the int8 codes (a filter pool, or the filter's maps masked)
        searched_with = index.scan_name(None if params.has_filters else min(params.k * params.page + 1, VEC0_MAX_K))
        if way:
            searched_with += f" ({way})"
    else:
        query = await build_query_vector(collection, params)
        rows = await _nearest_with_sqlite_vec(collection, plan, query)
        searched_with = "sqlite-vec"
    more = len(rows) > params.k and params.k * (params.page + 1) <= VEC0_MAX_K
    results = [shape_result(row, collection.links) for row in rows[:params.k]]
    if fused:  # the fused score in full (RRF's differ in the fifth place), and each map's place in each list
        for result, row in zip(results, rows):
            result["score"] = row["similarity"]
            if "ranks" in row:
                result["ranks"] = row["ranks"]
    if params.words and results:
        await _attach_matched_words(collection, params.words, results)
    answer = {
        "database": collection.name,
        "model": model.name,
        "searched_with": searched_with,
        # what each result's similarity is: a cosine similarity, or a fused ranking's score
        "ranking": ("hybrid" if params.rank == "hybrid" else params.fusion) if fused else "similarity",
        "models": [m["name"] for m in collection.models],
        "sql": plan.sql,
        "params": plan.params,
        "sql_url": collection.links.sql(plan.sql, plan.params),
        "results": results,
        "next": collection.links.next_page(params) if more else None,
        # how many maps the search ranked (known without a count when nothing narrows it)
        "searched": len(index) if index is not None and not params.has_filters and not behind else None,
    }
    if behind:  # the database holds vector changes the index is still reading
        answer["index_behind"] = True
        answer["index_note"] = ("the search index is catching up with recent changes to this collection: "
                                "maps added in the last few seconds may be missing")
    return answer


async def embed_upload(collection: SearchCollection, data: bytes, *, previews=None) -> bytes:
    """An uploaded image -> its query vector (hex in the URL from then on).  ``previews``: an object
    whose ``remember(vector, image)`` keeps a small picture of it (the page shows it back)."""
    settings = settings_of(collection.config)
    max_pixels = min(settings.max_upload_pixels, DEFAULT_MAX_PIXELS)
    max_decoded_bytes = settings.max_upload_decoded_bytes

    # Decoded (and refused) before the model is asked for: a bad upload never queues behind model work.
    min_size = collection.model.image_size or 224
    workers = collection.workers
    try:
        image = await _run_in(workers.decode, lambda: open_query_image(data, min_size=min_size, max_pixels=max_pixels,
                                                                       max_decoded_bytes=max_decoded_bytes))
        encoder = await _run_in(workers.model, collection.encoder)
        vector = vectors.encode(await _run_in(workers.model, encoder.embed_image, image))
        if previews is not None:
            await _run_in(workers.decode, previews.remember, vector, image)
        return vector
    except ImageDecodeError as error:
        raise UploadError(f"the upload is not a usable image: {error}") from None
    except ModelUnavailable as error:
        raise SearchUnavailable(str(error)) from None


def _thumbnail_url(links: Links, row: dict) -> str | None:
    """A stored thumbnail where the server serves one, else the catalogue's thumbnail URL."""
    return (links.thumbnail(row["id"]) if row["has_thumbnail"] else None) or web_url(row["thumbnail_url"])


async def map_summary(collection: SearchCollection, map_id: int) -> dict | None:
    """The "more like this" header: a map's title and thumbnail link."""
    row = await collection.db.execute_fn(lambda conn: store.read_map_summary(conn, map_id))
    if row:
        row["thumbnail_url"] = _thumbnail_url(collection.links, row)
    return row


def shape_result(row: dict, links: Links) -> dict:
    """A result as the API gives it: links for the catalogue record, thumbnail and full image."""
    map_id = row["id"]
    thumbnail_url = _thumbnail_url(links, row)
    record_url = links.record(map_id)
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
        "image_url": web_url(row["image_url"]) or thumbnail_url,
        "url": web_url(row["item_url"]) or record_url,
        "record_url": record_url,
        "map_url": links.map(map_id),
    }


NEIGHBOURS = 12  # the strip of nearest maps on a map's page


async def map_details(collection: SearchCollection, map_id: int, neighbours: int = NEIGHBOURS) -> dict:
    """A map's page, as data: its catalogue record, the deep-zoom source where the image is IIIF,
    the other sheets of its item, its nearest neighbours and its citations."""
    record = await collection.db.execute_fn(lambda conn: store.read_map_record(conn, map_id))
    if record is None:
        raise NotFound(f"no map {map_id} in this collection")
    links = collection.links
    image_url = web_url(record["image_url"])
    service = iiif.service_url(image_url) if image_url else None
    deep_zoom = None
    if service:
        # Only an image service the publisher allows: the viewer fetches its info.json, then tiles
        # from the host that info.json names (mapclip-map.js checks that one against the same list).
        loads = [] if settings_of(collection.config).iiif_hosts is not None else await collection.db.execute_fn(
            lambda conn: store.read_load_commands(conn, iiif.MAX_LOADS_READ))
        hosts = iiif.allowed_hosts(collection.config, loads)
        if iiif.host_allowed(f"{service}/info.json", hosts):
            deep_zoom = {"info_url": f"{service}/info.json", "hosts": hosts}
    sheets = []
    if record["item_id"]:
        rows = await collection.db.execute_fn(
            lambda conn: store.read_item_sheets(conn, record["item_id"]))
        sheets = [{"id": r["id"], "sheet": r["sheet"], "title": r["title"], "this": r["id"] == map_id,
                   "map_url": links.map(r["id"]), "thumbnail_url": _thumbnail_url(links, r)} for r in rows]
    try:
        found = await run_search(collection, SearchParams(like=map_id, k=neighbours + 1))
        near = [r for r in found["results"] if r["id"] != map_id][:neighbours]
    except NotFound:  # no vector for this model yet
        near = []
    shown = {key: record[key] for key in ("id", "title", "date", "year", "place", "notes", "format", "item_id",
                                         "sheet", "source", "width", "height")}
    words = [{key: word[key] for key in ("id", "text", "confidence", "x", "y", "w", "h", "angle")}
             for word in await collection.db.execute_fn(lambda conn: store.read_map_words(conn, map_id))]
    return {
        "database": collection.name,
        "model": collection.model.name,
        "map": {**shown, "subjects": citations.list_field(record["subjects"]),
                "contributors": citations.list_field(record["contributors"]),
                "url": web_url(record["item_url"]), "image_url": image_url,
                "thumbnail_url": _thumbnail_url(links, record),
                "record_url": links.record(map_id), "map_url": links.map(map_id)},
        # IIIF Image API: the viewer reads the service's info.json and asks for tiles of the full scan
        "deep_zoom": deep_zoom,
        # the words OCR read on it, boxes normalised to the image (x, y, w, h from the top left)
        "words": words,
        "sheets": sheets,
        "neighbours": near,
        "cite": citations.citations(record, repository_name=settings_of(collection.config).citation_repository),
    }
