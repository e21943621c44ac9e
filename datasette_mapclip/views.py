"""Routes: the search page, the JSON API and stored thumbnails."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import urllib.parse

from datasette.database import QueryInterrupted
from datasette.utils.asgi import Response

from . import index, search, vectors
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from .search import BadSearch, SearchParams
from .uploads import DEFAULT_MAX_UPLOAD_BYTES, UploadError, read_multipart

PLUGIN = "datasette-mapclip"
# One worker thread for model and index work: torch keeps an OpenMP pool per calling thread, and
# pools left spinning by other threads slow the next query (../shared/DESIGN.md: thread contention).
COMPUTE = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapclip-compute")


def config(datasette, database=None) -> dict:
    return datasette.plugin_config(PLUGIN, database=database) or {}


async def mapclip_databases(datasette) -> list[str]:
    """Databases that hold a mapclip ``models`` table, in Datasette's order."""
    names = []
    for name, db in datasette.databases.items():
        if name.startswith("_"):
            continue
        if await db.table_exists("models") and await db.table_exists("maps"):
            names.append(name)
    return names


async def pick_database(datasette, wanted: str | None) -> str:
    names = await mapclip_databases(datasette)
    if wanted:
        if wanted not in names:
            raise BadSearch(f"no mapclip collection named {wanted!r}; collections: {', '.join(names) or 'none'}")
        return wanted
    if not names:
        raise BadSearch("no database here holds a mapclip collection (load one with `mapclip load ...`)")
    return names[0]


async def models_of(datasette, database: str) -> list[dict]:
    rows = await datasette.get_database(database).execute("SELECT * FROM models ORDER BY is_default DESC, id")
    return [dict(r) for r in rows]


def choose_model(models: list[dict], name: str | None) -> dict:
    if not models:
        raise BadSearch("this collection has no embeddings yet")
    if name is None:
        return models[0]
    for model in models:
        if model["name"] == name:
            return model
    raise BadSearch(f"no model {name!r} in this collection; models: {', '.join(m['name'] for m in models)}")


class SearchFailed(Exception):
    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def index_key(datasette, database: str, model: dict):
    db = datasette.get_database(database)
    if not db.path:
        return None
    plugin_config = config(datasette, database)
    return (db.path, model["vector_table"], index.fingerprint(db.path, model["vector_table"]),
            plugin_config.get("int8_min_rows"), plugin_config.get("rerank"))


def index_for(datasette, database: str, model: dict):
    """The in-memory index for this model's vectors, or None while it is being built (or off)."""
    plugin_config = config(datasette, database)
    if plugin_config.get("index", "auto") == "off":
        return None
    key = index_key(datasette, database, model)
    if key is None:
        return None
    found = index.registry.get(key)
    if found is None:
        index.registry.ensure(key, lambda: index.build_for(key[0], model, plugin_config))
    return found


async def search_with_index(datasette, database, params, model, vector_index) -> list[dict] | None:
    """Top results from the in-memory index; None where the SQL path must answer."""
    from .encoders import encoder_for
    from .model import ModelUnavailable

    plugin_config = config(datasette, database)
    text_weight, image_weight = params.weights()

    def compute():
        # Encoding and scanning in the same (single) compute thread: see COMPUTE.
        parts = []
        if params.q:
            template = plugin_config.get("prompt_template") or "{}"
            parts.append((encoder_for(model, plugin_config).embed_text(template.format(params.q)), text_weight))
        if params.vector is not None:
            parts.append((vectors.decode(params.vector), image_weight))
        elif params.like is not None:
            stored = vector_index.vector_of(params.like)
            if stored is None:
                return None
            parts.append((stored, image_weight))
        if len(parts) == 1:
            query = vectors.normalise(parts[0][0])
        else:
            query = vectors.combine(parts)  # the same vector mapclip_combine gives the SQL path
        return vector_index.search(query, params.k * params.page)

    try:
        found = await asyncio.get_running_loop().run_in_executor(COMPUTE, compute)
    except ModelUnavailable as error:
        raise SearchFailed(f"model {model['name']} cannot be loaded: {error}", 503) from None
    if found is None:
        return []
    ids, scores = found
    ids, scores = ids[params.k * (params.page - 1):], scores[params.k * (params.page - 1):]
    if not len(ids):
        return []
    rows = await datasette.get_database(database).execute(
        f"SELECT {search.RESULT_COLUMNS} FROM maps WHERE id IN ({', '.join('?' * len(ids))})", [int(i) for i in ids])
    by_id = {row["id"]: dict(row) for row in rows}
    return [{**by_id[int(i)], "similarity": float(s)} for i, s in zip(ids, scores) if int(i) in by_id]


async def run_search(datasette, database: str, params: SearchParams) -> dict:
    models = await models_of(datasette, database)
    model = choose_model(models, params.model)
    search.check_vector(params, model)
    plan = search.plan(params, model)
    db = datasette.get_database(database)
    vector_index = None if params.has_filters else index_for(datasette, database, model)
    try:
        found = None
        if vector_index is not None:
            found = await search_with_index(datasette, database, params, model, vector_index)
        rows = found if found is not None else await db.execute(plan.sql, plan.params)
    except QueryInterrupted:
        raise SearchFailed(
            f"the search took longer than this server's {datasette.setting('sql_time_limit_ms')} ms limit: "
            "narrow it with filters, or ask the publisher to raise sql_time_limit_ms", 503) from None
    except Exception as error:  # sqlite errors, including our SQL functions' own messages
        message = str(error)
        if "chunks iter error" in message or message == "interrupted":
            raise SearchFailed(f"the search took longer than this server's {datasette.setting('sql_time_limit_ms')} ms limit", 503) from None
        if "cannot be loaded" in message or "were not found on this server" in message:
            raise SearchFailed(message, 503) from None
        if "fts5" in message or "maps_fts" in message:
            raise SearchFailed(f"the filter could not be used: {message}", 400) from None
        raise SearchFailed(message, 400) from None
    results = [search.shape_result(dict(row), database, datasette.urls) for row in rows]
    more = len(results) == params.k and params.k * (params.page + 1) <= search.VEC0_MAX_K
    base = datasette.urls.path("/-/mapclip/search.json")
    sql_url = datasette.urls.database(database) + "?" + urllib.parse.urlencode(
        {"sql": plan.sql, **{k: str(v) for k, v in plan.params.items()}}
    )
    return {
        "database": database,
        "model": model["name"],
        "searched_with": ("in-memory exact" if vector_index.exact else "in-memory int8 + exact re-scoring") if vector_index is not None else "sqlite-vec",
        "models": [m["name"] for m in models],
        "sql": plan.sql,
        "params": plan.params,
        "sql_url": sql_url,
        "results": results,
        "next": f"{base}?{params.query_string(page=params.page + 1)}&_db={urllib.parse.quote(database)}" if more else None,
    }


async def embed_upload(datasette, database: str, params: SearchParams, data: bytes) -> bytes:
    """An uploaded image -> the query vector (hex in the URL from then on)."""
    from .encoders import encoder_for
    from .model import ModelUnavailable
    from . import vectors

    model = choose_model(await models_of(datasette, database), params.model)
    plugin_config = config(datasette, database)
    max_pixels = int(plugin_config.get("max_upload_pixels", 50_000_000))

    def work():
        encoder = encoder_for(model, plugin_config)
        image = open_image(data, min_size=encoder.encoder.image_size, max_pixels=min(max_pixels, DEFAULT_MAX_PIXELS))
        return vectors.encode(encoder.embed_image(image))

    try:
        return await asyncio.get_running_loop().run_in_executor(COMPUTE, work)
    except ImageDecodeError as error:
        raise UploadError(f"the upload is not a usable image: {error}", 400) from None
    except ModelUnavailable as error:
        raise SearchFailed(str(error), 503) from None


async def read_search_request(datasette, request) -> tuple[str, SearchParams]:
    """GET args, or a POSTed form with an optional image; returns (database, params)."""
    args = {key: request.args.get(key) for key in request.args.keys()}
    upload = None
    if request.method == "POST":
        max_bytes = int(config(datasette).get("max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES))
        fields, files = await read_multipart(request, max_bytes)
        args.update({k: v for k, v in fields.items() if k != "csrftoken"})
        filename, data = files.get("image", (None, b""))
        if filename and not data:
            raise UploadError("the uploaded file is empty (0 bytes)")
        upload = data or None
    database = await pick_database(datasette, args.get("_db") or None)
    params = SearchParams.from_args(args)
    if upload:
        params.vector = await embed_upload(datasette, database, params, upload)
    return database, params


def error_response(message: str, status: int, as_json: bool):
    if as_json:
        return Response.json({"ok": False, "error": message, "status": status}, status=status)
    return Response.text(message, status=status)


async def search_json(request, datasette):
    try:
        database, params = await read_search_request(datasette, request)
        if not params.has_query:
            raise BadSearch("give q (text), like (a map id), vector, or POST an image")
        data = await run_search(datasette, database, params)
    except (BadSearch, UploadError, SearchFailed) as error:
        return error_response(str(error), getattr(error, "status", 400), True)
    data["ok"] = True
    return Response.json(data, default=str)


async def mapclip_page(request, datasette):
    error = None
    status = 200
    data = None
    database = None
    params = SearchParams()
    try:
        database, params = await read_search_request(datasette, request)
        if request.method == "POST":
            # Post/redirect/get: the uploaded image becomes a shareable URL.
            query = params.query_string()
            return Response.redirect(datasette.urls.path("/-/mapclip") + f"?{query}&_db={urllib.parse.quote(database)}")
        if params.has_query:
            data = await run_search(datasette, database, params)
    except (BadSearch, UploadError, SearchFailed) as problem:
        error, status = str(problem), getattr(problem, "status", 400)
    databases = await mapclip_databases(datasette)
    models = await models_of(datasette, database) if database else []
    like_row = None
    if database and params.like is not None:
        rows = await datasette.get_database(database).execute(
            "SELECT id, title, thumbnail_url, thumbnail IS NOT NULL AS has_thumbnail FROM maps WHERE id = ?", [params.like])
        like_row = dict(rows.first()) if rows.first() else None
        if like_row and like_row["has_thumbnail"]:
            like_row["thumbnail_url"] = datasette.urls.path(f"/-/mapclip/thumbnail/{database}/{params.like}.jpg")
    page = await datasette.render_template(
        "mapclip.html",
        {
            "params": params,
            "data": data,
            "error": error,
            "database": database,
            "databases": databases,
            "models": models,
            "model_name": (data or {}).get("model") or (models[0]["name"] if models else None),
            "like_row": like_row,
            "json_url": datasette.urls.path("/-/mapclip/search.json") + "?" + params.query_string()
                        + (f"&_db={urllib.parse.quote(database)}" if database else ""),
            "page_url": lambda **changes: datasette.urls.path("/-/mapclip") + "?" + params.query_string(**changes)
                        + (f"&_db={urllib.parse.quote(database)}" if database else ""),
            "demo_note": config(datasette, database).get("model_note"),
        },
        request=request,
    )
    return Response.html(page, status=status)


async def thumbnail(request, datasette):
    database = request.url_vars["database"]
    if database not in datasette.databases:
        return Response.text("no such database", status=404)
    rows = await datasette.get_database(database).execute(
        "SELECT thumbnail FROM maps WHERE id = ?", [int(request.url_vars["id"])])
    row = rows.first()
    if not row or row[0] is None:
        return Response.text("no thumbnail for that map", status=404)
    return Response(row[0], content_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})
