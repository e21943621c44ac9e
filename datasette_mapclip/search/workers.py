"""One server's worker threads, owned by its plugin state (state.py), never by the process.

- ``model``: the one thread that runs the model (text and uploaded images, for the search route and
  the SQL functions alike): torch keeps an OpenMP pool per calling thread, and pools left spinning
  by other threads slow the next query;
- ``index``: index scans (numpy and faiss, GIL released); ``decode``: image decoding; work that
  needs no model, so "more like this" and a bad upload never wait behind text encoding;
- ``text``: text queries waiting for the model thread together are encoded in one forward pass.

Each server sets its own thread counts in its own threads: a second server's start-up (another
Datasette in the same process, as tests make) leaves the first one's alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue

import numpy as np

from ..runtime import set_faiss_threads, set_torch_threads
from ..settings import settings_of
from . import query_vector


class TextBatcher:
    """Text queries that wait for the model thread together are encoded together: one forward pass
    for all of them (32 short queries cost a few single ones), so concurrent text searches share the
    model instead of queueing one by one behind it.  ``collection`` is anything with ``model``,
    ``config`` and ``encoder()`` (service.SearchCollection)."""

    max_batch = 32

    def __init__(self, model_thread: concurrent.futures.Executor):
        self.model_thread = model_thread
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()

    async def vector(self, collection, text: str) -> np.ndarray:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.waiting.put((collection, text, future))
        self.model_thread.submit(self._drain)
        return await asyncio.wrap_future(future)

    def _drain(self):
        """In the model thread: everything waiting now, grouped by model and prompt template."""
        batch = []
        while len(batch) < self.max_batch:
            try:
                batch.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        groups: dict[tuple, list] = {}
        for collection, text, future in batch:
            if future.set_running_or_notify_cancel():  # False: the request went away
                key = (collection.model.name, collection.model.get("checkpoint_sha256"),
                       settings_of(collection.config).prompt_template)
                groups.setdefault(key, []).append((collection, text, future))
        for items in groups.values():
            collection = items[0][0]
            try:
                found = query_vector.text_vectors(collection.encoder(), [text for _, text, _ in items],
                                                  collection.config)
            except Exception as error:  # ModelUnavailable and the like: each request answers it
                for _, _, future in items:
                    future.set_exception(error)
                continue
            for (_, _, future), vector in zip(items, found):
                future.set_result(vector)


class Workers:
    def __init__(self):
        self.model = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapclip-model")
        self.index = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapclip-index-scan")
        self.decode = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapclip-decode")
        self.text = TextBatcher(self.model)

    def set_threads(self, threads: int):
        """CPU threads, set in the threads that do the work (torch and faiss keep the count per
        thread): torch's for the model and decode threads, not on the event loop, where importing
        torch (~1.5 s) would hold up the server's start.  The index thread runs faiss on one thread:
        faiss's own threads split a batch of queries, not one query, so the index splits a scan
        itself (``scan_threads``, index.Int8Scanner) instead."""
        for pool in (self.model, self.decode):
            pool.submit(set_torch_threads, threads, only_if_imported=True)
        self.index.submit(set_faiss_threads, 1)

    def shutdown(self):
        for pool in (self.model, self.index, self.decode):
            pool.shutdown(wait=False, cancel_futures=True)

    def in_model_thread(self, fn):
        """Run ``fn`` in the model thread and wait for it (from a thread that is not the event
        loop: the SQL functions, in Datasette's SQL threads)."""
        return self.model.submit(fn).result()
