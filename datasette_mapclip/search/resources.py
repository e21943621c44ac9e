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
    # (file, vector table, largest id) -> the vectors fused rankings standardise over (service.py)
    fusion_samples: dict = dataclasses.field(default_factory=dict)
    # (file, its stamp, kind, terms) -> how common a hybrid search's full-text terms are (service.py)
    full_text_counts: dict = dataclasses.field(default_factory=dict)

    def set_threads(self, threads: int):
        """CPU threads for the model and decoding (workers.py); an index's scan threads are its own."""
        self.workers.set_threads(threads)
