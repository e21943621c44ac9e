"""What one Datasette server holds for this plugin, and its configuration.

Each ``Datasette`` instance gets its own search resources (encoders with their remembered load
failures, vector indexes, worker threads) and its own collection owner, created on first use and
released with the instance; nothing is a module-level global that one server (or one test) could
leak into another.
"""

from __future__ import annotations

import dataclasses
import weakref

from ..search.resources import SearchResources
from ..settings import Settings
from . import compat
from .collections import Collections
from .local_images import LocalImageCache
from .uploads import UploadPreviews

PLUGIN = "datasette-mapclip"


@dataclasses.dataclass
class PluginState(SearchResources):
    collections: Collections | None = None
    upload_previews: UploadPreviews = dataclasses.field(default_factory=UploadPreviews)
    local_images: LocalImageCache = dataclasses.field(default_factory=LocalImageCache)  # web/local_images.py
    score_ranges: dict = dataclasses.field(default_factory=dict)  # (file, model) -> the About page's figures


_states: "weakref.WeakKeyDictionary[object, PluginState]" = weakref.WeakKeyDictionary()


def state_for(datasette) -> PluginState:
    state = _states.get(datasette)
    if state is None:
        state = PluginState()
        state.collections = Collections(datasette, state, plugin_config)
        state = _states.setdefault(datasette, state)
    return state


def collections_of(datasette) -> Collections:
    return state_for(datasette).collections


def plugin_config(datasette, database: str | None = None) -> Settings:
    """``plugins: datasette-mapclip:`` from metadata (per database where given), every declared
    setting present and of its declared type (settings.py)."""
    return Settings(compat.plugin_config(datasette, PLUGIN, database=database) or {},
                    where=f"{PLUGIN} ({database})" if database else PLUGIN)
