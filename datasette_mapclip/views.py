"""Routes: the search page, the JSON API and stored thumbnails.  The work is the search service's."""

from __future__ import annotations

import functools
import urllib.parse

from datasette.utils.asgi import Forbidden, Response

from . import search
from .errors import BadSearch, NotFound, SearchError, UploadError
from .query import MAX_ID, SearchParams
from .state import plugin_config
from .uploads import UploadLimits, read_multipart

# The routes that take an upload (their POSTs pass through uploads.limit_upload_bodies).
UPLOAD_PATHS = ("/-/mapclip", "/-/mapclip/search.json")


async def read_search_request(datasette, request) -> tuple[search.Collection, SearchParams]:
    """GET args, or a POSTed form with an optional image -> (collection, params)."""
    # Repeated arguments (``term``, ``term_weight``) keep every value, in order.
    args = {key: request.args.getlist(key) for key in request.args.keys()}
    upload = None
    if request.method == "POST":
        # No body is read for an actor who may not search here.
        await search.ensure_can_upload(datasette, request.actor, _first(args, "_db"))
        fields, files = await read_multipart(request, UploadLimits.from_config(plugin_config(datasette)))
        args.update({k: v for k, v in fields.items() if k != "csrftoken"})
        filename, data = files.get("image", (None, b""))
        if filename and not data:
            raise UploadError("the uploaded file is empty (0 bytes)")
        upload = data or None
    params = SearchParams.from_args(args)
    collection = await search.open_collection(datasette, request.actor, _first(args, "_db") or None, params.model)
    if upload:
        params.vector = await search.embed_upload(collection, upload)
    return collection, params


def _first(args: dict, key: str):
    values = args.get(key)
    return values[0] if isinstance(values, list) and values else values


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
                problem = search.unavailable_if_interrupted(error, datasette)
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
        data = await search.run_search(collection, params)
    except SearchError as error:
        return error_response(error, as_json=True)
    except Forbidden as error:  # Datasette's permission checks; the same 403, as JSON
        return error_response(SearchError(f"Forbidden: {error}", 403), as_json=True)
    data["ok"] = True
    return Response.json(data, default=str)


@answers_503_when_cut(as_json=False)
async def mapclip_page(request, datasette):
    error = None
    status = 200
    headers = {}
    data = None
    collection = None
    params = SearchParams()
    try:
        collection, params = await read_search_request(datasette, request)
        if request.method == "POST":
            # Post/redirect/get: the uploaded image becomes a shareable URL.
            return Response.redirect(datasette.urls.path("/-/mapclip") + "?" + params.query_string()
                                     + f"&_db={urllib.parse.quote(collection.name)}")
        if params.has_query:
            data = await search.run_search(collection, params)
    except SearchError as problem:
        error, status, headers = str(problem), problem.status, closing_headers(problem)
    except Exception as problem:  # a statement cut by the time limit, wherever it ran
        cut = search.unavailable_if_interrupted(problem, datasette)
        if cut is None:
            raise
        error, status = str(cut), cut.status
    database = collection.name if collection else None
    like_row = None
    if collection and params.like is not None and status != 503:
        like_row = await search.map_summary(collection, params.like)
    db_arg = f"&_db={urllib.parse.quote(database)}" if database else ""
    page = await datasette.render_template(
        "mapclip.html",
        {
            "params": params,
            "data": data,
            "error": error,
            "database": database,
            "databases": await search.collection_names(datasette, request.actor),
            "models": collection.models if collection else [],
            "model_name": (data or {}).get("model") or (collection.model["name"] if collection else None),
            "like_row": like_row,
            "json_url": datasette.urls.path("/-/mapclip/search.json") + "?" + params.query_string() + db_arg,
            "page_url": lambda **changes: datasette.urls.path("/-/mapclip") + "?" + params.query_string(**changes)
                        + db_arg,
            "demo_note": plugin_config(datasette, database).get("model_note"),
        },
        request=request,
    )
    return Response.html(page, status=status, headers=headers)


@answers_503_when_cut(as_json=False)
async def thumbnail(request, datasette):
    try:
        map_id = int(request.url_vars["id"])
        if map_id > MAX_ID:
            raise NotFound("no such map")
        data = await search.thumbnail(datasette, request.actor, request.url_vars["database"], map_id)
    except NotFound as error:
        return Response.text(str(error), status=error.status)
    # A thumbnail of a collection behind permissions must not sit in shared caches.
    public = await search.can_view(datasette, None, request.url_vars["database"])
    cache = "public, max-age=86400" if public else "private, max-age=3600"
    return Response(data, content_type="image/jpeg", headers={"Cache-Control": cache})
