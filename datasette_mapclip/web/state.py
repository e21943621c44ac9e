"""What one Datasette server holds for this plugin, and its configuration.

Each ``Datasette`` instance gets its own encoders (with their remembered load failures), its
own vector indexes and its own worker threads, created on first use and released with the instance; nothing is a module-level
global that one server (or one test) could leak into another.
"""

from __future__ import annotations

import dataclasses
import weakref

from ..model.encoders import EncoderCache
from ..search.index import IndexRegistry
from ..search.workers import Workers
from ..settings import Settings
from . import compat

PLUGIN = "datasette-mapclip"


@dataclasses.dataclass
class PluginState:
    encoders: EncoderCache = dataclasses.field(default_factory=EncoderCache)
    indexes: IndexRegistry = dataclasses.field(default_factory=IndexRegistry)
    workers: Workers = dataclasses.field(default_factory=Workers)


_states: "weakref.WeakKeyDictionary[object, PluginState]" = weakref.WeakKeyDictionary()


def state_for(datasette) -> PluginState:
    state = _states.get(datasette)
    if state is None:
        state = _states.setdefault(datasette, PluginState())
    return state


def plugin_config(datasette, database: str | None = None) -> Settings:
    """``plugins: datasette-mapclip:`` from metadata (per database where given), every declared
    setting present and of its declared type (settings.py)."""
    return Settings(compat.plugin_config(datasette, PLUGIN, database=database) or {},
                    where=f"{PLUGIN} ({database})" if database else PLUGIN)
