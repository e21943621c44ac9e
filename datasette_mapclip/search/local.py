"""Search a collection file from Python (or the command line) with no server: the same search
service the Datasette plugin runs, over the file opened read-only.

    from datasette_mapclip.search.local import Collection

    with Collection("maps.db") as maps:
        answer = maps.search("nautical chart", year_min=1850, k=10)
        for result in answer["results"]:
            print(result["similarity"], result["title"])

``search`` takes the search page's parameters by the same names (``like``, ``weight``, ``term`` and
``term_weight`` as lists, ``more``, ``fewer``, ``year_min``, ``place``, ``filter``, ``k``, ``page``,
``model``) and answers what ``search.json`` answers; ``image`` is a file path or bytes.  The calls
are plain functions (a private event loop runs the service), so they work in a script and in a
notebook alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import string
import threading
import time
import urllib.parse
from pathlib import Path

from .. import store
from ..settings import Settings
from . import service
from .errors import BadSearch
from .query import SearchParams
from .resources import SearchResources


class FileDatabase:
    """A collection file as the search service reads it: one read-only connection with sqlite-vec,
    used from one thread; ``execute`` stops a statement after ``time_limit_ms`` (None: no limit)."""

    def __init__(self, path: str | Path, time_limit_ms: int | None = None, mmap_mb: int = 0):
        self.path = str(Path(path).resolve())
        self.time_limit_ms = time_limit_ms
        self.mmap_mb = mmap_mb
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapclip-file")
        self._conn = None

    def _connection(self):
        if self._conn is None:
            sqlite3 = store.sqlite3_module()
            conn = sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode=ro", uri=True, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            store.load_sqlite_vec(conn)
            store.map_file_into_memory(conn, self.mmap_mb)
            self._conn = conn
        return self._conn

    async def execute_fn(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(self._connection()))

    async def execute(self, sql: str, params=None, **options):
        def run(conn):
            started = time.monotonic()
            if self.time_limit_ms:
                deadline = started + self.time_limit_ms / 1000
                conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
            try:
                return conn.execute(sql, params or {}).fetchall()
            except Exception as error:
                if service.cut_by_time_limit(error, time.monotonic() - started, self.time_limit_ms):
                    raise service.Interrupted(str(error)) from None
                raise
            finally:
                conn.set_progress_handler(None, 0)

        return await self.execute_fn(run)

    def close(self):
        def close_connection():
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._thread.submit(close_connection).result()
        self._thread.shutdown(wait=True)


def search_args(q: str | None = None, **params) -> dict:
    """Keyword arguments -> the page's parameters (lists stay lists, numbers become text)."""
    args = {"q": q} if q is not None else {}
    for name, value in params.items():
        if value is None:
            continue
        args[name] = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
    return args


class Collection:
    """One collection file, searchable from Python.  ``settings`` takes the plugin's settings by the
    same names (settings.py), e.g. ``{"index": "off"}``."""

    def __init__(self, path: str | Path, *, model: str | None = None, settings: dict | None = None,
                 time_limit_ms: int | None = None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no collection file at {path}")
        store.open_collection_readonly(path).close()  # StoreError: not a collection (nothing is written)
        self.path = Path(path)
        self.model_name = model
        self.settings = Settings(settings or {}, where="Collection settings")
        self.resources = SearchResources()
        self.resources.set_threads(self.settings.threads)
        self.db = FileDatabase(path, time_limit_ms, self.settings.sqlite_mmap_mb)
        self._loop = asyncio.new_event_loop()
        self._runner = threading.Thread(target=self._loop.run_forever, name="mapclip-local-search", daemon=True)
        self._runner.start()
        self._collections: dict[str | None, service.SearchCollection] = {}

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _collection(self, model: str | None) -> service.SearchCollection:
        name = model or self.model_name
        if name not in self._collections:
            try:
                self._collections[name] = await service.open_collection(
                    self.path.stem, self.db, self.db.path, self.settings, self.resources, model_name=name)
            except store.ModelNotFound as error:
                raise BadSearch(str(error)) from None
        return self._collections[name]

    def collection(self, model: str | None = None) -> service.SearchCollection:
        """The service's view of the file with one model chosen (the default model without one)."""
        return self._run(self._collection(model))

    def search(self, q: str | None = None, *, image: str | Path | bytes | None = None, **params) -> dict:
        """One search; the answer is ``search.json``'s (results, the SQL that reproduces it, ...)."""
        return self._run(self._search(q, image, params))

    async def _search(self, q, image, params) -> dict:
        model = params.get("model")
        collection = await self._collection(str(model) if model else None)
        if params.get("term"):  # image:FILE terms become the file's vector, as the page sends an upload's
            terms = [params["term"]] if isinstance(params["term"], str) else list(params["term"])
            for i, term in enumerate(terms):
                kind, _, rest = str(term).partition(":")
                if kind == "image" and rest and Path(rest).is_file():
                    terms[i] = "image:" + (await service.embed_upload(collection, Path(rest).read_bytes())).hex()
                elif kind == "image" and rest and not all(c in string.hexdigits for c in rest.strip()):
                    raise BadSearch(f"term {shown_term(term)}: no such image file (an image term is image:FILE "
                                    "or image:<hex vector>)")
            params = {**params, "term": terms}
        parsed = SearchParams.from_args(search_args(q, **params))
        if image is not None:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            parsed.vector = await service.embed_upload(collection, data)
        if not parsed.has_query:
            raise BadSearch("give q (text), like (a map id), image, vector or term")
        return await service.run_search(collection, parsed)

    def map(self, map_id: int, *, model: str | None = None) -> dict:
        """One map's record, sheets, nearest neighbours and citations (the map page's data)."""
        async def details():
            return await service.map_details(await self._collection(model), int(map_id))

        return self._run(details())

    def close(self):
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._runner.join()
        self._loop.close()
        self.db.close()
        self.resources.workers.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shown_term(term) -> str:
    text = str(term)
    return repr(text if len(text) <= 80 else text[:79] + "…")
