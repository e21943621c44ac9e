"""What the public pages tell a visitor: the "About this search" page (what the model is, where its
weights came from, what it was and was not trained on, its known weaknesses, what a score means, how
to report a problem) and the search page's optional example links.

Everything here is read from the database's own provenance (the ``models`` table) and the plugin's
configuration; the templates escape all of it, and only http(s) URLs (``search/links.web_url``) become links.
"""

from __future__ import annotations

import asyncio
import logging

from datasette.utils.asgi import Forbidden

from .. import store
from ..search.errors import SearchError
from ..search.links import web_url
from ..search.query import MAX_QUERY_CHARS, SearchParams
from ..search.service import map_summary, run_search
from ..store.ids import map_id_or_none
from . import compat
from .state import collections_of, state_for
from .urls import MapclipUrls

log = logging.getLogger(__name__)

MODELS_TABLE = "models"  # the provenance the about page shows is read from it
MAX_EXAMPLES = 8
MAX_EXAMPLE_CHARS = 200

# Where open_clip's pretrained weights came from, by the start of their tag (open_clip's names).
# Plain words for a visitor; the exact tag is shown beside them.
WEIGHT_SOURCES = [
    ("openai", "OpenAI's original CLIP weights (2021), trained by OpenAI on about 400 million pictures "
               "paired with their captions, collected from the public web. OpenAI has not published that "
               "collection. These are the weights the paper this search follows used."),
    ("laion400m", "open_clip weights trained on LAION-400M: 400 million pictures and their alt text, "
                  "taken from web pages in the Common Crawl."),
    ("laion2b", "open_clip weights trained on LAION-2B: about two billion pictures and their alt text "
                "(the English-language part of LAION-5B), taken from web pages in the Common Crawl."),
    ("laion", "open_clip weights trained on one of the LAION collections of pictures and alt text "
              "taken from web pages in the Common Crawl."),
    ("datacomp", "open_clip weights trained on a DataComp pool: pictures and alt text taken from web "
                 "pages in the Common Crawl, then filtered."),
    ("commonpool", "open_clip weights trained on a DataComp CommonPool: pictures and alt text taken from "
                   "web pages in the Common Crawl."),
    ("metaclip", "MetaCLIP weights: pictures and captions from the public web, balanced over a list of "
                 "topics by Meta."),
    ("dfn", "Data Filtering Network weights: pictures and captions from the public web, filtered by a "
            "model trained for that."),
    ("webli", "weights trained on WebLI, Google's collection of pictures and text from the public web."),
    ("yfcc15m", "open_clip weights trained on 15 million Flickr photos and their descriptions (YFCC)."),
    ("cc12m", "open_clip weights trained on Conceptual 12M: 12 million web pictures and their alt text."),
]


def weights_source(model: dict) -> str:
    """Where a model's weights came from, in plain words, from its provenance row."""
    pretrained = _text(model.get("pretrained"))
    if pretrained:
        for prefix, words in WEIGHT_SOURCES:
            if pretrained.lower().startswith(prefix):
                return words
        return (f"pretrained weights that open_clip calls “{pretrained}”; open_clip's list of pretrained "
                "models says what they were trained on.")
    if _text(model.get("checkpoint_sha256")):
        return ("a weights file supplied by the publisher of this site, for example a CLIP model fine-tuned "
                "on captions made from this collection's catalogue records, or a model trained here from "
                "scratch; the publisher's note says which where there is one.")
    return "not recorded in this collection."


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def model_facts(model: dict, default: bool) -> dict:
    """One ``models`` row as the about page shows it (no server file paths)."""
    image_size = _text(model.get("image_size"))
    facts = [  # (label, value, shown as code): what a visitor can use
        ("Architecture", _text(model.get("architecture")), True),
        ("Pretrained weights tag", _text(model.get("pretrained")), True),
        ("Image size the model reads", f"{image_size} pixels square" if image_size else None, False),
    ]
    # A developer's details (fingerprint, software versions, precision) are in the ``models`` row's
    # JSON, linked from the page (``record_url``), not on it.
    fine_tuned = not _text(model.get("pretrained")) and bool(_text(model.get("checkpoint_sha256")))
    size = model.get("image_size")
    return {
        "name": _text(model.get("name")) or "unnamed",
        "default": default,
        "source": weights_source(model),
        "fine_tuned": fine_tuned,
        "web_trained": bool(_text(model.get("pretrained"))),  # open_clip's pretrained weights: web pictures
        "image_size": size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None,
        "facts": [fact for fact in facts if fact[1]],
        "id": model.get("id"),
    }


def what_the_models_are(collections: list[dict]) -> dict:
    """What the about page's general sections may say of the models it describes: whether any was
    trained on web pictures (a pretrained tag), and the image sizes they read (where shown)."""
    models = [model for collection in collections for model in collection["models"]]
    return {"web_trained": any(model.get("web_trained") for model in models),
            "checkpoint_only": bool(models) and all(model.get("web_trained") is False for model in models),
            "image_sizes": sorted({model["image_size"] for model in models if model.get("image_size")})}


def model_summary(model: dict, default: bool) -> dict:
    """A model as the about page shows it to an actor who may not view the ``models`` table: its
    name (the search page shows it too), nothing read from its provenance."""
    return {"name": _text(model.get("name")) or "unnamed", "default": default, "source": None,
            "fine_tuned": False, "facts": [], "details_hidden": True}


async def can_view_provenance(datasette, actor, name: str) -> bool:
    """Whether the actor may view the collection's ``models`` table, where the provenance shown on
    the about page comes from (checked as Datasette's own table page checks it)."""
    try:
        await compat.ensure_view_table(datasette, actor, name, MODELS_TABLE)
        return True
    except Forbidden:
        return False


async def describe_collection(datasette, name: str, config: dict, actor=None) -> dict:
    """A collection as the about page describes it: its title, models and the publisher's notes.
    The caller has checked that the actor may view the collection; the models' provenance (weights,
    fingerprints, software versions) only for an actor who may also view the ``models`` table."""
    db = datasette.get_database(name)
    models = await db.execute_fn(store.read_models)
    default = store.pick_model(models)["id"] if models else None
    title = await database_title(datasette, name)
    provenance = await can_view_provenance(datasette, actor, name)
    described = [(model_facts if provenance else model_summary)(m, m["id"] == default)
                 for m in sorted(models, key=lambda m: (m["id"] != default, m["id"]))]
    if provenance:
        for model in described:
            model["record_url"] = datasette.urls.row(name, MODELS_TABLE, str(model["id"]), format="json")
    return {
        "name": name,
        "title": _text(title) or name,
        "models": described,
        "note": _text(config.get("model_note")),
        "training_note": _text(config.get("training_note")),
        "scores": await measured_scores(datasette, name) if models else None,
    }


SCORE_SAMPLE = 20  # the collection's own titles searched as text queries
SCORE_RANKS = (1, 10)  # the best match's score, and the 10th's


async def measured_scores(datasette, name: str) -> dict | None:
    """What scores look like on this collection with the model it is searched with by default:
    its own titles (a fixed sample, ``store.read_sample_titles``) searched as text, exactly as the
    search page runs them; for the best match and the 10th, the lowest and highest score.  Measured
    once per (file, model) and kept in the plugin state; None where it cannot be measured (no text
    encoder, no titles), so the page then says nothing about it."""
    try:
        collection = await collections_of(datasette).load(name)
    except store.ModelNotFound:
        return None
    except Exception as error:  # an optional paragraph: never the reason the page fails
        log.warning("mapclip: the scores of %s could not be measured: %s", name, error)
        return None
    cache = state_for(datasette).score_ranges
    key = (collection.path or name, collection.model.name)
    found = cache.get(key)
    if found is None:
        found = cache[key] = asyncio.ensure_future(_measure(collection))
    if isinstance(found, asyncio.Future):
        try:
            result = await asyncio.shield(found)
        except Exception as error:  # a search cut by the time limit: tried again by a later visit
            log.warning("mapclip: the scores of %s could not be measured: %s", name, error)
            cache.pop(key, None)
            return None
        cache[key] = found = (result,)  # the figures (None: not measurable), not a task bound to this loop
    return found[0]


async def _measure(collection) -> dict | None:
    titles = await collection.db.execute_fn(lambda conn: store.read_sample_titles(conn, SCORE_SAMPLE))
    scores: dict[int, list[float]] = {rank: [] for rank in SCORE_RANKS}
    searched = 0
    for title in titles:
        try:
            found = await run_search(collection, SearchParams(q=title[:MAX_QUERY_CHARS], k=max(SCORE_RANKS)))
        except SearchError as error:
            if error.status >= 500:  # no text encoder here: nothing to measure
                return None
            continue  # this title is no query (refused): the next one
        searched += 1
        similarities = [result["similarity"] for result in found["results"]]
        for rank in SCORE_RANKS:
            if len(similarities) >= rank:
                scores[rank].append(similarities[rank - 1])
    if not scores[1]:
        return None
    return {"model": collection.model.name, "queries": searched,
            "ranks": [{"rank": rank, "low": min(values), "high": max(values)}
                      for rank, values in scores.items() if values]}


async def database_title(datasette, name: str) -> str | None:
    """The database's ``title`` from Datasette's metadata, or None."""
    try:
        return _text((await compat.database_metadata(datasette, name)).get("title"))
    except Exception:  # only a heading: the database's name serves as well
        return None


async def unreadable_collection(datasette, name: str) -> dict:
    title = await database_title(datasette, name)
    return {"name": name, "title": _text(title) or name, "models": [], "note": None, "training_note": None,
            "unreadable": True}


def report_channels(config: dict) -> dict:
    """How a visitor reports a problem: ``report_url`` (a link only when it is http(s)) and/or
    ``contact`` (shown as text: an email address, a desk, a phone number)."""
    return {"url": web_url(config.get("report_url")), "contact": _text(config.get("contact"))}


def example_queries(config: dict) -> list[str]:
    """``example_queries`` from the collection's plugin configuration: short strings only."""
    raw = config.get("example_queries")
    if not isinstance(raw, (list, tuple)):
        return []
    found = []
    for value in raw:
        if isinstance(value, str) and value.strip() and len(value.strip()) <= MAX_EXAMPLE_CHARS:
            found.append(value.strip())
    return found[:MAX_EXAMPLES]


def example_map_id(config: dict) -> int | None:
    raw = config.get("example_map")
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (int, str)):
        return None
    return map_id_or_none(str(raw))


async def examples(datasette, collection, config: dict) -> dict:
    """The search page's example links: text queries, and "maps like this one" for ``example_map``
    (only when that map is in the collection).  Empty when the configuration names none."""
    urls = MapclipUrls(datasette)
    queries = [{"text": q, "url": urls.page(SearchParams(q=q).query_string(), collection.name)}
               for q in example_queries(config)]
    example = None
    map_id = example_map_id(config)
    if map_id is not None:
        try:
            row = await map_summary(collection, map_id)
        except Exception as error:  # an optional link: never the reason a page fails
            log.warning("mapclip: example_map %s of %s could not be read: %s", map_id, collection.name, error)
            row = None
        if row:
            example = {"id": map_id, "title": _text(row.get("title")) or f"map {map_id}",
                       "thumbnail_url": row.get("thumbnail_url"),
                       "url": urls.page(SearchParams(like=map_id).query_string(), collection.name)}
    return {"queries": queries, "map": example}

