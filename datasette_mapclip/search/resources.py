"""What runs a search's work: the encoders (each model loaded once, its load failure remembered),
the in-memory vector indexes and the worker threads.  A Datasette server holds one set (web/state.py),
a Python or command-line caller its own (local.py); nothing here is a module-level global."""

from __future__ import annotations

import dataclasses

from ..model.encoders import EncoderCache
from .index import IndexRegistry
from .workers import Workers


@dataclasses.dataclass
class SearchResources:
    encoders: EncoderCache = dataclasses.field(default_factory=EncoderCache)
    indexes: IndexRegistry = dataclasses.field(default_factory=IndexRegistry)
    workers: Workers = dataclasses.field(default_factory=Workers)

    def set_threads(self, threads: int, scan_threads: int = 1):
        """CPU threads for the model, decoding and index scans (workers.py)."""
        self.workers.set_threads(threads, scan_threads)
