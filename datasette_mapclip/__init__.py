"""datasette-mapclip: CLIP search over map collections. Only Datasette hooks live here."""

import functools
import logging

from datasette import hookimpl

from . import store
from .search import service
from .search.sql_functions import DatabaseFunctions, register
from .settings import settings_of
from .web import cells, compat, map_views, views
from .web.state import collections_of, plugin_config, state_for
from .web.uploads import CSRF_CHECKED_KEY, FormCsrf, UploadLimits, limit_upload_bodies
from .web.urls import MapclipUrls, routes

log = logging.getLogger(__name__)


@hookimpl
def prepare_connection(conn, database, datasette):
    db = datasette.databases.get(database)
    path = getattr(db, "path", None)
    immutable = db is not None and not db.is_mutable
    # sqlite-vec goes only into collections' connections: every other database stays exactly as
    # Datasette opened it (load_sqlite_vec switches extension loading off again whatever happens).
    if store.file_is_collection(path):
        try:
            store.load_sqlite_vec(conn)
        except Exception as error:
            log.warning("mapclip: sqlite-vec could not be loaded for database %s: %s", database, error)
        store.map_file_into_memory(conn, settings_of(plugin_config(datasette, database)).sqlite_mmap_mb)
    # Nothing registered may refer to conn (see sqlite_native): the models are read through a
    # connection of their own, so a connection Datasette drops unclosed is still freed.
    state = state_for(datasette)
    register(conn, DatabaseFunctions(lambda: store.read_models_at(path, immutable=immutable),
                                     lambda: plugin_config(datasette, database),
                                     functools.partial(encoder_from_file, state.encoders, path),
                                     state.workers.in_model_thread))


def encoder_from_file(encoders, path, model_row, config):
    """The SQL functions' encoder: the query encoders the file carries, else open_clip."""
    stored = store.StoredQueryEncoders(path, model_row["name"]) if path else None
    return encoders.get(model_row, config, stored=stored)


HIDDEN_TABLES = ("map_vectors", "mapclip_meta")


def get_metadata(datasette):
    # vec0 tables and their shadow tables ("map_vectors_<model>..."): their table pages answer
    # 400 on Datasette 0.65 and mean nothing to a reader; Datasette hides every table whose
    # name starts with a hidden one.  Only collections get this, and each gets dicts of its own:
    # Datasette merges hook metadata into its own in place, so a shared dict would carry one
    # database's settings (an allow block) into another.  (Datasette 1.0 drops this hook: use
    # compat.hide_tables at start-up there.)
    databases = {
        name: {"tables": {table: {"hidden": True} for table in HIDDEN_TABLES}}
        for name, db in datasette.databases.items()
        if not name.startswith("_") and store.file_is_collection(db.path)
    }
    return {"databases": databases} if databases else {}


if compat.has_hook("get_metadata"):  # Datasette 0.65 (1.0: compat.hide_tables at start-up)
    get_metadata = hookimpl(get_metadata)
else:
    del get_metadata


@hookimpl
def startup(datasette):
    # The server process is Datasette's; the plugin sets only what its configuration names.
    config = plugin_config(datasette)
    state_for(datasette).set_threads(config.threads)

    async def build_indexes():
        # Index every collection's default model in the background, and load its model in the model
        # thread meanwhile, so the first searches are fast; until an index is ready, searches go
        # through sqlite-vec.
        collections = collections_of(datasette)
        for name in await collections.names():
            await compat.hide_tables(datasette, name, HIDDEN_TABLES)
            try:
                collection = await collections.load(name)
            except store.ModelNotFound:
                continue  # no embeddings yet
            except Exception as error:  # one unreadable collection must not stop the server's start
                log.warning("mapclip: collection %s is not indexed at start-up: %s", name, error)
                continue
            service.start_up(collection, settings_of(collection.config).preload_model)

    return build_indexes


@hookimpl
def render_cell(row, value, column, table, database, datasette):
    return cells.thumbnail_cell(datasette, row, value, column, table, database)


@hookimpl
def register_routes():
    return routes(views, map_views)


@hookimpl
def asgi_wrapper(datasette):
    # Upload limits that hold before Datasette's own CSRF middleware parses a multipart body.
    csrf = FormCsrf(datasette) if compat.has_hook("skip_csrf") else None  # 0.65: asgi-csrf reads form bodies

    def wrap(app):
        return limit_upload_bodies(app, views.UPLOAD_PATHS, lambda: UploadLimits.from_config(plugin_config(datasette)),
                                   csrf)

    return wrap


if compat.has_hook("skip_csrf"):  # Datasette 0.65 (the 1.0 alphas read no form body for CSRF)
    @hookimpl
    def skip_csrf(datasette, scope):
        # A multipart form whose token asgi_wrapper's check has already compared (web/uploads.py).
        return scope.get(CSRF_CHECKED_KEY) is True


@hookimpl
def menu_links(datasette, actor):
    async def inner():
        # Only where this actor has something to search (asked on every page: stop at the first).
        for name in datasette.databases:
            if await collections_of(datasette).is_visible(actor, name):
                return [{"href": MapclipUrls(datasette).page(), "label": "Map search"}]
        return []

    return inner


@hookimpl
def database_actions(datasette, actor, database):
    async def inner():
        if await collections_of(datasette).is_visible(actor, database):
            return [{"href": MapclipUrls(datasette).page(database=database), "label": "Search these maps by image or text"}]
        return []

    return inner
