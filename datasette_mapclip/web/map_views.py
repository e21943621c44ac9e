"""Routes for one map and for taking results away: a map's own page (and its JSON and citation
files), and the current result set as CSV or JSON.  The work is the search service's."""

from __future__ import annotations

import json

from datasette.utils.asgi import Response

from ..search import citations, service
from ..search.errors import BadSearch, NotFound, SearchError
from ..search.query import SearchParams, first_value
from ..store.ids import map_id_or_none
from . import local_images, vendor
from .state import collections_of, plugin_config, state_for
from .urls import MapclipUrls, attachment
from .views import answers_503_when_cut, error_response, map_in_path

CITATION_FILES = {
    ".bib": ("application/x-bibtex; charset=utf-8", lambda cite: cite["bibtex"]),
    ".csl.json": ("application/vnd.citationstyles.csl+json", lambda cite: json.dumps([cite["csl_json"]], indent=2)),
    ".txt": ("text/plain; charset=utf-8", lambda cite: cite["text"] + "\n"),
}


@answers_503_when_cut(as_json=False)
async def map_page(request, datasette):
    """``/-/mapclip/map/<database>/<id>``, and the same data as ``.json``, ``.bib``, ``.csl.json``, ``.txt``."""
    suffix = request.url_vars.get("format") or ""
    as_json = suffix == ".json"
    try:
        database, map_id = map_in_path(datasette, request)
        if not await collections_of(datasette).holds(database):
            raise NotFound("no such collection")
        collection = await collections_of(datasette).open(request.actor, database,
                                                         (request.args.get("model") or "").strip() or None)
        details = await service.map_details(collection, map_id)
        details["local_image"] = await local_image(datasette, details, database, map_id)
    except SearchError as error:
        if not as_json and not suffix:
            return Response.html(await datasette.render_template(
                "mapclip_map.html", {"error": str(error), "details": None, "search_url": MapclipUrls(datasette).page()},
                request=request), status=error.status)
        return error_response(error, as_json=as_json)
    if as_json:
        return Response.json({"ok": True, **details}, default=str)
    if suffix in CITATION_FILES:
        content_type, render = CITATION_FILES[suffix]
        name = citations.bibtex_key(details["map"]) + suffix
        return Response(render(details["cite"]), content_type=content_type,
                        headers={"content-disposition": attachment(name)})
    viewer = vendor.openseadragon_present()
    page = await datasette.render_template("mapclip_map.html", {
        "details": details,
        "map": details["map"],
        "error": None,
        "viewer_script": datasette.urls.static_plugins("datasette-mapclip", vendor.OPENSEADRAGON_SCRIPT)
        if viewer else None,
        "viewer_images": datasette.urls.static_plugins("datasette-mapclip", vendor.OPENSEADRAGON_IMAGES),
        "search_url": MapclipUrls(datasette).page(),
        "highlight": map_id_or_none(request.args.get("word") or ""),  # a search's matched word
        "like_url": MapclipUrls(datasette).page(SearchParams(like=details["map"]["id"]).query_string(),
                                                details["database"]),
    }, request=request)
    return Response.html(page)


async def local_image(datasette, details: dict, database: str, map_id: int) -> dict | None:
    """The map's own local file for the deep-zoom viewer, where it has no IIIF service and the file
    is a readable picture; the page then shows the file's true size."""
    if details["deep_zoom"] is not None:
        return None
    found = await local_images.viewer_source(state_for(datasette), datasette.get_database(database), map_id)
    if found is None:
        return None
    details["map"]["width"], details["map"]["height"] = found["width"], found["height"]
    return {**found, "url": MapclipUrls(datasette).image(database, map_id)}


@answers_503_when_cut(as_json=False)
async def map_image(request, datasette):
    """``/-/mapclip/image/<database>/<id>.jpg``: a map's local image, re-encoded for the viewer,
    with the map page's permission checks; 404 where there is none."""
    collections = collections_of(datasette)
    try:
        database, map_id = map_in_path(datasette, request)
        if not await collections.holds(database):
            raise NotFound("no such collection")
        await collections.choose(request.actor, database)  # Datasette's 403, as on the map's page
        data = await local_images.image_bytes(state_for(datasette), datasette.get_database(database), map_id,
                                              plugin_config(datasette, database))
    except SearchError as error:
        return Response.text(str(error), status=error.status)
    # An image of a collection behind permissions must not sit in shared caches.
    public = await collections.can_view(None, database)
    cache = "public, max-age=86400" if public else "private, max-age=3600"
    return Response(data, content_type="image/jpeg", headers={"Cache-Control": cache})


@answers_503_when_cut(as_json=True)
async def export_results(request, datasette):
    """``/-/mapclip/export.csv`` and ``export.json``: the page of results a search URL shows, with
    the same fields in both (``citations.EXPORT_FIELDS``), as a download."""
    as_csv = request.url_vars["format"] == "csv"
    args = {key: request.args.getlist(key) for key in request.args.keys()}
    try:
        params = SearchParams.from_args(args)
        if not params.has_query:
            raise BadSearch("give the search's own parameters (q, like, vector, term, more): export the results of a search")
        database = first_value(args, "_db")
        collection = await collections_of(datasette).open(request.actor, database, params.model)
        data = await service.run_search(collection, params)
    except SearchError as error:
        return error_response(error, as_json=not as_csv)
    rows = citations.export_rows(data["results"], first_rank=params.k * (params.page - 1) + 1)
    filename = f"mapclip-{data['database']}-results"
    if as_csv:
        return Response(citations.results_csv(rows), content_type="text/csv; charset=utf-8",
                        headers={"content-disposition": attachment(f"{filename}.csv")})
    body = {"database": data["database"], "model": data["model"], "query": params.query_string(),
            "sql": data["sql"], "params": data["params"], "fields": list(citations.EXPORT_FIELDS), "rows": rows}
    return Response(json.dumps(body, indent=2, default=str), content_type="application/json; charset=utf-8",
                    headers={"content-disposition": attachment(f"{filename}.json")})
