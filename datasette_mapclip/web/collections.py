"""The one owner of "which of this server's databases are collections, and which may this actor see".

``Collections`` (one per server, in its plugin state) answers discovery (is a database a collection:
asked of the database once and cached), permission (Datasette's own checks on the ``maps`` table, as
its table page makes them) and turns a request's choice into a ``search.service.SearchCollection``: the
database adapted to the service (``DatasetteDatabase``), the server's links (``DatasetteLinks``) and
its time limit.  A collection the actor may not view is invisible: never listed, 403 when named.
"""

from __future__ import annotations

import time
import urllib.parse
import weakref

from datasette.database import QueryInterrupted
from datasette.utils.asgi import Forbidden

from .. import store
from ..search import service
from ..search.errors import BadSearch, NotFound
from ..search.query import SearchParams
from ..search.resources import SearchResources
from . import compat
from .urls import MapclipUrls

# A database found not to hold a collection is asked again after this long (a load may make one
# while the server runs); one that holds a collection keeps the answer.
NOT_A_COLLECTION_RECHECK_SECONDS = 5.0


def time_limit_ms(datasette) -> int | None:
    return datasette.setting("sql_time_limit_ms")


def unavailable_if_interrupted(error: Exception, datasette):
    """Any SQLite statement of a request cut by the server's time limit (Datasette's QueryInterrupted,
    or SQLite's own SQLITE_INTERRUPT code, wherever it surfaces) -> the 503 that says so."""
    if isinstance(error, QueryInterrupted):
        error = service.Interrupted(str(error))
    return service.unavailable_if_interrupted(error, time_limit_ms(datasette))


def too_slow_message(datasette) -> str:
    return service.too_slow_message(time_limit_ms(datasette))


class DatasetteDatabase:
    """A Datasette ``Database`` as the search service reads it: its time limit's QueryInterrupted
    becomes the service's ``Interrupted``."""

    def __init__(self, db):
        self.db = db

    @property
    def path(self):
        return self.db.path

    async def execute(self, sql, params=None, **options):
        started = time.monotonic()
        try:
            return await self.db.execute(sql, params, **options)
        except QueryInterrupted as error:
            raise service.Interrupted(str(error)) from None
        except Exception as error:
            limit = options.get("custom_time_limit") or self.db.ds.setting("sql_time_limit_ms")
            if service.cut_by_time_limit(error, time.monotonic() - started, limit):
                raise service.Interrupted(str(error)) from None
            raise

    async def execute_fn(self, fn):
        return await self.db.execute_fn(fn)


class DatasetteLinks:
    """The URLs of one collection's pages on this server."""

    def __init__(self, datasette, database: str):
        self.datasette, self.database = datasette, database
        self.urls = MapclipUrls(datasette)

    def thumbnail(self, map_id):
        return self.urls.thumbnail(self.database, map_id)

    def map(self, map_id):
        return self.urls.map(self.database, map_id)

    def record(self, map_id):
        return self.datasette.urls.row(self.database, store.MAPS_TABLE, str(map_id))

    def sql(self, sql, params):
        return compat.query_url(self.datasette, self.database) + "?" + urllib.parse.urlencode(
            {"sql": sql, **{k: str(v) for k, v in params.items()}})

    def next_page(self, params: SearchParams):
        return self.urls.search_json(params.query_string(page=params.page + 1), self.database)


class Collections:
    def __init__(self, datasette, resources: SearchResources, config_for):
        self._datasette = weakref.ref(datasette)  # the server owns this, not the other way round
        self.resources = resources
        self.config_for = config_for  # (datasette, database name) -> Settings
        self._known: dict[str, tuple[object, bool, float]] = {}  # name -> (database, answer, when)

    @property
    def datasette(self):
        return self._datasette()

    # -- discovery ----------------------------------------------------------------
    async def holds(self, name: str) -> bool:
        """Whether a served database (not Datasette's internal ones) holds a mapclip collection."""
        db = self.datasette.databases.get(name)
        if db is None or name.startswith("_"):
            return False
        known = self._known.get(name)
        if known and known[0] is db and (known[1] or time.monotonic() - known[2] < NOT_A_COLLECTION_RECHECK_SECONDS):
            return known[1]
        answer = bool(await db.execute_fn(store.is_collection))
        self._known[name] = (db, answer, time.monotonic())
        return answer

    async def names(self) -> list[str]:
        """Databases that hold a mapclip collection, in Datasette's order, whoever is asking."""
        return [name for name in list(self.datasette.databases) if await self.holds(name)]

    # -- permission ---------------------------------------------------------------
    async def ensure_can_view(self, actor, name: str):
        """Datasette's own checks for the collection's ``maps`` table, as its table page makes them
        (view-table, then view-database, then view-instance; the first decision wins).  Raises
        Datasette's ``Forbidden``, which Datasette answers with its 403."""
        await compat.ensure_view_table(self.datasette, actor, name, store.MAPS_TABLE)

    async def can_view(self, actor, name: str) -> bool:
        try:
            await self.ensure_can_view(actor, name)
            return True
        except Forbidden:
            return False

    async def is_visible(self, actor, name: str) -> bool:
        """Whether one database is a collection this actor may view (without looking at the others)."""
        return await self.holds(name) and await self.can_view(actor, name)

    async def visible_names(self, actor) -> list[str]:
        """The collections this actor may view, in Datasette's order."""
        return [name for name in await self.names() if await self.can_view(actor, name)]

    async def choose(self, actor, wanted: str | None) -> str:
        """The collection a request names (``_db``) or the first one the actor may view.  A named
        collection the actor may not view answers Datasette's 403, as its database page does."""
        await compat.ensure_view_instance(self.datasette, actor)
        if wanted:
            if not await self.holds(wanted):
                names = await self.visible_names(actor)
                raise BadSearch(f"no mapclip collection named {wanted!r}; collections: {', '.join(names) or 'none'}")
            await self.ensure_can_view(actor, wanted)
            return wanted
        names = await self.visible_names(actor)
        if not names:
            raise BadSearch("no database here holds a mapclip collection you can view")
        return names[0]

    async def choose_before_upload(self, actor, wanted: str | None) -> str | None:
        """Checked before an upload's body is read: the collection named in the URL, or (when the form
        names it) some collection, must be one this actor may view; else Datasette's 403.  Returns the
        collection the search will use when the form does not name another (None: decided after)."""
        await compat.ensure_view_instance(self.datasette, actor)
        names = await self.names()
        if wanted in names:
            await self.ensure_can_view(actor, wanted)
            return wanted
        if wanted:
            return None  # not a collection here: the search answers that, after the form is read
        visible = [name for name in names if await self.can_view(actor, name)]
        if names and not visible:
            raise Forbidden("no collection here that you may view")
        return visible[0] if visible else None

    # -- opening ------------------------------------------------------------------
    async def open(self, actor, wanted: str | None, model_name: str | None = None) -> service.SearchCollection:
        """The collection a request names, permission checked, with its model (BadSearch if none fits)."""
        name = await self.choose(actor, wanted)
        try:
            return await self.load(name, model_name)
        except store.ModelNotFound as error:
            raise BadSearch(str(error)) from None

    async def load(self, name: str, model_name: str | None = None) -> service.SearchCollection:
        """A collection with its models read and one chosen (ModelNotFound if none fits); no permission
        check: callers that answer a request use ``open``."""
        db = self.datasette.get_database(name)
        return await service.open_collection(
            name, DatasetteDatabase(db), db.path, self.config_for(self.datasette, name), self.resources,
            model_name=model_name, links=DatasetteLinks(self.datasette, name),
            time_limit_ms=time_limit_ms(self.datasette))

    async def thumbnail(self, actor, name: str, map_id: int) -> bytes:
        if not await self.holds(name):
            raise NotFound("no such collection")
        await self.ensure_can_view(actor, name)
        data = await self.datasette.get_database(name).execute_fn(lambda conn: store.read_thumbnail(conn, map_id))
        if data is None:
            raise NotFound("no thumbnail for that map")
        return data
