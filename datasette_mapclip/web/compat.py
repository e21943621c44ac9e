"""The few places where Datasette 0.65.x and the 1.0 alphas differ, in one module: every other
module calls these and never checks Datasette's version itself.

- Permissions: 0.65 has ``ensure_permissions(actor, [(action, resource), ...])`` (the first
  decision wins); 1.0 has ``ensure_permission(action=, resource=, actor=)``/``allowed()`` with
  resource objects, where ``view-table`` already cascades to the table's database and the
  instance, and whose actions exist only once the server has started.
- Plugin settings: 1.0 reads them from the configuration (``-c datasette.yml``; it still moves
  ``plugins`` and ``allow`` out of metadata), and its per-database ``plugin_config`` loses the
  fall-back to the instance's settings once a database has any configuration of its own.
- Hidden tables: 1.0 has no ``get_metadata`` hook; hidden tables are marked in its configuration.
- SQL: 1.0 runs arbitrary SQL at ``/db/-/query`` (``/db?sql=`` redirects there).
- Database metadata: ``metadata()`` on 0.65, ``get_database_metadata()`` on 1.0.
"""

from __future__ import annotations

from datasette.utils.asgi import Forbidden

try:  # Datasette 1.0 alphas
    from datasette.resources import TableResource
except ImportError:  # Datasette 0.65.x
    TableResource = None

DATASETTE_1 = TableResource is not None


def has_hook(name: str) -> bool:
    """Whether this Datasette declares a plugin hook (1.0 dropped ``get_metadata``: a plugin that
    still implements it is reported as implementing a hook that does not exist)."""
    from datasette import hookspecs

    return hasattr(hookspecs, name)


async def _ready(datasette) -> None:
    """1.0 registers its permission actions at start-up: a check made before it (a hook called
    from code that never started the server, as tests do) would fail with "Unknown action"."""
    if not getattr(datasette, "_startup_invoked", True):
        await datasette.invoke_startup()


async def ensure_view_instance(datasette, actor) -> None:
    """Datasette's 403 unless the actor may view the instance."""
    if DATASETTE_1:
        await _ready(datasette)
        await datasette.ensure_permission(action="view-instance", actor=actor)
    else:
        await datasette.ensure_permissions(actor, ["view-instance"])


async def ensure_view_table(datasette, actor, database: str, table: str) -> None:
    """Datasette's 403 unless the actor may view the table, checked as Datasette's own table page
    checks it on each line."""
    if DATASETTE_1:
        await _ready(datasette)
        await datasette.ensure_permission(action="view-instance", actor=actor)
        if not await datasette.allowed(action="view-table", resource=TableResource(database=database, table=table),
                                       actor=actor):
            raise Forbidden("You do not have permission to view this table")
    else:
        await datasette.ensure_permissions(actor, [
            ("view-table", (database, table)), ("view-database", database), "view-instance"])


async def hide_tables(datasette, database: str, prefixes: tuple[str, ...]) -> None:
    """On the 1.0 alphas, mark a collection's tables whose names start with ``prefixes`` hidden in
    Datasette's configuration (0.65 hides them through ``get_metadata``, which also hides every
    table whose name starts with a hidden one; 1.0 hides only the tables it names)."""
    if not DATASETTE_1:
        return
    db = datasette.get_database(database)
    names = (await db.execute("select name from sqlite_master where type = 'table'")).rows
    config = datasette.config if datasette.config is not None else {}
    tables = config.setdefault("databases", {}).setdefault(database, {}).setdefault("tables", {})
    for (name,) in names:
        if name.startswith(prefixes):
            tables.setdefault(name, {})["hidden"] = True
    datasette.config = config


def plugin_config(datasette, plugin: str, database: str | None = None) -> dict | None:
    """A plugin's settings for a database, else the instance's (0.65's behaviour).  Datasette
    1.0a41's ``plugin_config(database=...)`` loses the fall-back to the instance's settings as soon
    as the database has any configuration of its own (an ``allow`` block, a hidden table)."""
    config = datasette.plugin_config(plugin, database=database)
    if config is None and database is not None:
        config = datasette.plugin_config(plugin)
    return config


def query_url(datasette, database: str) -> str:
    """Where Datasette runs arbitrary SQL against a database: ``/db?sql=`` on 0.65, ``/db/-/query?sql=``
    on the 1.0 alphas (their ``/db?sql=`` only redirects there)."""
    url = datasette.urls.database(database)
    return url + "/-/query" if DATASETTE_1 else url


async def database_metadata(datasette, database: str) -> dict:
    """A database's own metadata (title, description...): ``metadata()`` on 0.65,
    ``get_database_metadata()`` on the 1.0 alphas."""
    if DATASETTE_1:
        return await datasette.get_database_metadata(database) or {}
    return datasette.metadata(database=database, fallback=False) or {}
