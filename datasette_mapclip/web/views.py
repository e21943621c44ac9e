"""Routes: the search page, the JSON API and stored thumbnails.  The work is the search service's."""

from __future__ import annotations

import functools
import logging
import re

from datasette.utils.asgi import Forbidden, Response

from .. import store
from ..search import service
from ..search.errors import BadSearch, NotFound, SearchError, UploadError
from ..search.query import (
    DEFAULT_FUSION,
    MAX_FEEDBACK,
    MAX_QUERY_CHARS,
    MAX_TERMS,
    PAGE_FUSION,
    SearchParams,
    first_value,
)
from ..search.sql import words_were_read
from ..settings import settings_of
from ..store.ids import map_id_or_none
from . import about, compat
from .collections import too_slow_message, unavailable_if_interrupted
from .state import collections_of, plugin_config, state_for
from .uploads import UPLOADER_COOKIE, UploadLimits, read_multipart, uploader_token
from .urls import MapclipUrls, database_from_segment

log = logging.getLogger(__name__)

# Where read_search_request leaves a new uploader token for the page's redirect to set.
NEW_UPLOADER_KEY = "mapclip.new_uploader"
# The routes that take an upload (their POSTs pass through uploads.limit_upload_bodies).
UPLOAD_PATHS = (MapclipUrls.PAGE, MapclipUrls.SEARCH_JSON)


async def read_search_request(datasette, request, *, page: bool = False) -> tuple[service.SearchCollection,
                                                                                 SearchParams]:
    """GET args, or a POSTed form with an optional image -> (collection, params).  ``page``: the
    search page, whose fusion without a ``fusion`` argument is its own default (``PAGE_FUSION``)."""
    # Repeated arguments (``term``, ``term_weight``) keep every value, in order.
    args = {key: request.args.getlist(key) for key in request.args.keys()}
    collections = collections_of(datasette)
    upload = chosen = None
    if request.method == "POST":
        # No body is read for an actor who may not search here.
        chosen = await collections.choose_before_upload(request.actor, first_value(args, "_db"))
        fields, files = await read_multipart(request, UploadLimits.from_config(plugin_config(datasette)))
        args.update({k: v for k, v in fields.items() if k != "csrftoken"})
        filename, data = files.get("image", (None, b""))
        if filename and not data:
            raise UploadError("the uploaded file is empty (0 bytes)")
        upload = data or None
    params = SearchParams.from_args(args)
    if page and not (first_value(args, "fusion") or "").strip():
        params.fusion = PAGE_FUSION
    wanted = first_value(args, "_db") or None
    if chosen is not None and wanted in (None, chosen):  # permission was checked before the body was read
        try:
            collection = await collections.load(chosen, params.model)
        except store.ModelNotFound as error:
            raise BadSearch(str(error)) from None
    else:
        collection = await collections.open(request.actor, wanted, params.model)
    if params.model is not None and params.model == store.pick_model(collection.models).name:
        params.model = None  # the default model: links and shared URLs do not carry it
    if upload:
        uploader, new = uploader_token(request)
        if new:
            request.scope[NEW_UPLOADER_KEY] = uploader  # set as a cookie on the redirect
        params.vector = await service.embed_upload(
            collection, upload, previews=state_for(datasette).upload_previews.for_owner(uploader))
    return collection, params


def map_in_path(datasette, request) -> tuple[str, int]:
    """(database name, map id) from a path that names one map (a thumbnail, a map's page), decoded
    as Datasette decodes its own paths; NotFound (404) for a database or an id that cannot exist."""
    database = database_from_segment(datasette, request.url_vars["database"])
    if database is None:
        raise NotFound("no such collection")
    map_id = map_id_or_none(request.url_vars["id"])
    if map_id is None:
        raise NotFound("no such map: a map id is a whole number from 0 to 2**63-1, in ASCII digits")
    return database, map_id


def error_response(error: SearchError, as_json: bool):
    if as_json:
        response = Response.json({"ok": False, "error": str(error), "status": error.status}, status=error.status)
    else:
        response = Response.text(str(error), status=error.status)
    response.headers.update(closing_headers(error))
    return response


def closing_headers(error) -> dict:
    # An upload refused part-way leaves its body unread: closing the connection spares the server
    # from reading (and discarding) the rest of it.
    return {"connection": "close"} if isinstance(error, UploadError) else {}


def answers_503_when_cut(as_json: bool):
    """Any SQLite statement of the request cut by the server's time limit, wherever it ran (the search,
    Datasette's own permission checks, the page's collection list) -> the 503 that says so, never a 500."""
    def decorate(view):
        @functools.wraps(view)
        async def guarded(request, datasette):
            try:
                return await view(request, datasette)
            except Exception as error:
                problem = unavailable_if_interrupted(error, datasette)
                if problem is None:
                    raise
                return error_response(problem, as_json=as_json)
        return guarded
    return decorate


@answers_503_when_cut(as_json=True)
async def search_json(request, datasette):
    try:
        collection, params = await read_search_request(datasette, request)
        if not params.has_query:
            raise BadSearch("give q (text), like (a map id), vector, or POST an image")
        data = await service.run_search(collection, params)
    except SearchError as error:
        return error_response(error, as_json=True)
    except Forbidden as error:  # Datasette's permission checks; the same 403, as JSON
        return error_response(SearchError(f"Forbidden: {error}", 403), as_json=True)
    data["ok"] = True
    return Response.json(data, default=str)


# Advice meant for whoever runs the server (command lines, options, configuration, paths on the
# server): the JSON API and the server's log keep it; the public page says in plain words what a
# visitor can do instead.
OPERATOR_ADVICE = re.compile(r"(^|\s)--[a-z]|`mapclip |\bmapclip (load|import-beto|fine-tune)\b|HF_HOME|~/\.cache"
                             r"|\bpip install\b|metadata\.yml|plugins\.datasette-mapclip|\bstate_dict\b", re.IGNORECASE)
VISITOR_MESSAGES = {
    503: "Searching by words or by a picture is not available on this site right now. "
         "“More like this” on a map still works. Please try again later.",
    400: "This collection cannot be searched yet.",
}


EMPTY_SEARCH = ("Type some words to search for, upload a picture, or open a map and choose "
                "“More like this”.")


def visitor_message(message: str, status: int, datasette) -> str:
    """An error as the public page shows it: a visitor's own mistake as it was; the server's problems
    (a model that cannot be loaded, advice for the operator) in plain words.  The time limit's 503
    says what a visitor can do, and stays."""
    operator = OPERATOR_ADVICE.search(message) or (status == 503 and message != too_slow_message(datasette))
    if not operator:
        return message
    log.warning("mapclip: a search page answered %s: %s", status, message)
    return VISITOR_MESSAGES.get(status, "This search could not run. Please try again later.")


def marked(params: SearchParams, kind: str, map_id: int) -> dict:
    """Relevance feedback after one click on a result: marked "more" (or "fewer") like this one, or
    unmarked if it already was; a map is never in both, and the oldest marks go past the limit."""
    more, fewer = list(params.more), list(params.fewer)
    target, other = (more, fewer) if kind == "more" else (fewer, more)
    if map_id in target:
        target.remove(map_id)
    else:
        target.append(map_id)
        if map_id in other:
            other.remove(map_id)
    return {"more": tuple(more[-MAX_FEEDBACK:]), "fewer": tuple(fewer[-MAX_FEEDBACK:])}


def menu_models(collection, params: SearchParams) -> list:
    """The models the page's menu offers: the default one, those the publisher lists in
    ``models_menu``, and the one this search asked for.  A fine-tune's start model, kept in the file
    for comparison, is not offered to visitors unless listed."""
    if collection is None:
        return []
    default = store.pick_model(collection.models).name
    offered = {default, params.model, *(settings_of(collection.config).models_menu or ())}
    return [model for model in collection.models if model.name in offered]


def about_url(datasette, database: str | None) -> str:
    return MapclipUrls(datasette).about(database)


@answers_503_when_cut(as_json=False)
async def mapclip_page(request, datasette):
    error = None
    status = 200
    headers = {}
    data = None
    collection = None
    params = SearchParams()
    try:
        collection, params = await read_search_request(datasette, request, page=True)
        if request.method == "POST":
            # Post/redirect/get: the uploaded image becomes a shareable URL (its preview is shown only
            # to this browser: uploads.UploadPreviews).
            redirect = Response.redirect(MapclipUrls(datasette).page(page_query(params), collection.name))
            if NEW_UPLOADER_KEY in request.scope:
                redirect.set_cookie(UPLOADER_COOKIE, request.scope[NEW_UPLOADER_KEY], httponly=True,
                                    samesite="lax")
            return redirect
        if params.has_query:
            data = await service.run_search(collection, params)
        elif "q" in request.args:  # the form sent with nothing to search for: say so, do not just reload
            error = EMPTY_SEARCH
    except SearchError as problem:
        error, status, headers = visitor_message(str(problem), problem.status, datasette), problem.status, closing_headers(problem)
        if params == SearchParams():  # the parameters were refused: keep the visitor's words in the box
            params = SearchParams(q=(request.args.get("q") or "").strip()[:MAX_QUERY_CHARS] or None)
    except Exception as problem:  # a statement cut by the time limit, wherever it ran
        cut = unavailable_if_interrupted(problem, datasette)
        if cut is None:
            raise
        error, status = str(cut), cut.status
    database = collection.name if collection else None
    like_row = None
    examples = {"queries": [], "map": None}
    if collection and status != 503:
        if params.like is not None:
            like_row = await service.map_summary(collection, params.like)
        examples = await about.examples(datasette, collection, collection.config)
    urls = MapclipUrls(datasette)
    page = await datasette.render_template(
        "mapclip.html",
        {
            "params": params,
            "data": data,
            "error": error,
            "database": database,
            "databases": await collections_of(datasette).visible_names(request.actor),
            "models": menu_models(collection, params),
            "has_words": bool(params.words) or (collection is not None and status != 503
                                                and await collection.db.execute_fn(words_were_read)),
            "model_name": (data or {}).get("model") or (collection.model.name if collection else None),
            "like_row": like_row,
            "upload_preview": state_for(datasette).upload_previews.data_url(params.vector,
                                                                            request.cookies.get(UPLOADER_COOKIE)),
            "examples": examples,
            "max_terms": MAX_TERMS,
            "about_url": about_url(datasette, database),
            "form_url": urls.page(),
            "json_url": urls.search_json(params.query_string(), database),
            "page_url": lambda **changes: urls.page(page_query(params, **changes), database),
            "fusions": FUSION_CHOICES,
            "map_page_url": lambda map_id: urls.map(database, map_id),
            "mark_url": lambda kind, map_id: urls.page(page_query(params, page=1, **marked(params, kind, map_id)),
                                                       database),
            "export_url": lambda extension: urls.export(extension, params.query_string(), database),
        },
        request=request,
    )
    return Response.html(page, status=status, headers=headers)


# The page's fusion control: value, label.
FUSION_CHOICES = (
    ("rrf", "each term has an equal say (ranks fused)"),
    ("standardised", "each term has an equal say (scores standardised)"),
    ("average", "one averaged query (the paper's)"),
)


def page_query(params: SearchParams, **changes) -> str:
    """A page URL's query: a URL without ``fusion`` means the page's default there, so the paper's
    average, the API's default, is written out when it was chosen."""
    query = params.query_string(**changes)
    if changes.get("fusion", params.fusion) == DEFAULT_FUSION != PAGE_FUSION:
        query += ("&" if query else "") + f"fusion={DEFAULT_FUSION}"
    return query


def unique_channels(channels: list[dict]) -> list[dict]:
    found = []
    for channel in channels:
        if (channel["url"] or channel["contact"]) and channel not in found:
            found.append(channel)
    return found


@answers_503_when_cut(as_json=False)
async def about_page(request, datasette):
    """"About this search": each collection this actor may view (or the one ``_db`` names), its model's
    provenance, what the model was and was not trained on, its known weaknesses, what a score means,
    and how to report a problem.  A collection the actor may not view is neither listed nor described."""
    await compat.ensure_view_instance(datasette, request.actor)
    wanted = request.args.get("_db") or None
    status = 200
    error = None
    if wanted is not None:
        if await collections_of(datasette).holds(wanted):
            await collections_of(datasette).ensure_can_view(request.actor, wanted)  # Datasette's 403
            names = [wanted]
        else:
            names, status, error = [], 404, "There is no map collection of that name here."
    else:
        names = await collections_of(datasette).visible_names(request.actor)
    collections = []
    for name in names:
        config = plugin_config(datasette, name)
        try:
            described = await about.describe_collection(datasette, name, config, request.actor)
        except Exception as problem:  # a damaged provenance table: say so, never a 500
            if unavailable_if_interrupted(problem, datasette) is not None:
                raise
            log.warning("mapclip: the models of %s could not be read: %s", name, problem)
            described = await about.unreadable_collection(datasette, name)
        collections.append({**described,
                            "search_url": MapclipUrls(datasette).page(database=name),
                            "report": about.report_channels(config)})
    page = await datasette.render_template(
        "mapclip_about.html",
        {
            "collections": collections,
            "models_are": about.what_the_models_are(collections),
            "error": error,
            "search_url": MapclipUrls(datasette).page(database=wanted if wanted and collections else None),
            "reports": unique_channels([c["report"] for c in collections] + [about.report_channels(plugin_config(datasette))]),
        },
        request=request,
    )
    return Response.html(page, status=status)


@answers_503_when_cut(as_json=False)
async def thumbnail(request, datasette):
    try:
        database, map_id = map_in_path(datasette, request)
        data = await collections_of(datasette).thumbnail(request.actor, database, map_id)
    except NotFound as error:
        return Response.text(str(error), status=error.status)
    # A thumbnail of a collection behind permissions must not sit in shared caches.
    public = await collections_of(datasette).can_view(None, database)
    cache = "public, max-age=86400" if public else "private, max-age=3600"
    return Response(data, content_type="image/jpeg", headers={"Cache-Control": cache})
