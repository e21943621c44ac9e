"""datasette-mapclip: CLIP search over map collections. Only Datasette hooks live here."""

from datasette import hookimpl

from . import views
from .sql_functions import DatabaseFunctions, register


@hookimpl
def prepare_connection(conn, database, datasette):
    from .store import load_sqlite_vec

    try:
        load_sqlite_vec(conn)
    except Exception:
        pass  # already loaded, or this Python cannot load extensions: the functions still register

    def models():
        try:
            return [dict(zip([c[0] for c in cursor.description], row))
                    for cursor in [conn.execute("SELECT * FROM models")] for row in cursor.fetchall()]
        except Exception:
            return []

    register(conn, DatabaseFunctions(models, lambda: views.config(datasette, database)))


@hookimpl
def get_metadata(datasette):
    # vec0 tables and their shadow tables ("map_vectors_<model>..."): their table pages answer
    # 400 on Datasette 0.65 and mean nothing to a reader; Datasette hides every table whose
    # name starts with a hidden one.  (Datasette 1.0 drops this hook: use metadata.yml there.)
    hidden = {"tables": {"map_vectors": {"hidden": True}, "mapclip_meta": {"hidden": True}}}
    return {"databases": {name: hidden for name in datasette.databases if not name.startswith("_")}}


@hookimpl
def startup(datasette):
    async def build_indexes():
        # Index every collection's default model in the background so the first searches are fast;
        # until an index is ready, searches go through sqlite-vec.
        for database in await views.mapclip_databases(datasette):
            models = await views.models_of(datasette, database)
            if models:
                views.index_for(datasette, database, models[0])

    return build_indexes


@hookimpl
def register_routes():
    return [
        (r"^/-/mapclip$", views.mapclip_page),
        (r"^/-/mapclip/search\.json$", views.search_json),
        (r"^/-/mapclip/thumbnail/(?P<database>[^/]+)/(?P<id>\d+)\.jpg$", views.thumbnail),
    ]


@hookimpl
def menu_links(datasette):
    return [{"href": datasette.urls.path("/-/mapclip"), "label": "Map search"}]


@hookimpl
def database_actions(datasette, database):
    async def inner():
        if database in await views.mapclip_databases(datasette):
            return [{"href": datasette.urls.path(f"/-/mapclip?_db={database}"), "label": "Search these maps by image or text"}]
        return []

    return inner
