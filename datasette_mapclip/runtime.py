"""Process-wide settings, each changed in one place and only by the entry point that owns the process.

Library modules (model loading, image decoding, the store) never change these on import or as a
side effect of a call, so a notebook that imports them keeps its own settings.  The owners are:

- the ``mapclip`` commands (``datasette_mapclip.cli`` and the command groups it assembles), and
- the Datasette plugin's ``startup`` hook (a server process belongs to Datasette; the plugin only
  sets what its configuration names).

    limit_image_pixels     Pillow's decompression-bomb threshold; ``images.open_image`` enforces its own
                           cap per call, this only raises Pillow's ceiling when a command allows more.
    set_torch_threads      torch's CPU thread count.  A server encodes with one thread per request:
                           a 2-thread encode fell from 60 ms to ~1 s when another process held a core.
    prefer_hub_cache_when_offline
                           huggingface_hub retries an unreachable host for ~50 s before it looks in
                           its cache; where the hub cannot be reached, go straight to the cache.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import sys

HUB_HOST = "huggingface.co"


def limit_image_pixels(max_pixels: int):
    """Let Pillow open images up to ``max_pixels`` (it refuses twice its own limit outright)."""
    from PIL import Image

    current = Image.MAX_IMAGE_PIXELS
    if current is not None and max_pixels > 2 * current:
        Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


def set_torch_threads(threads: int | None, *, only_if_imported: bool = False):
    """torch's intra-op CPU threads for this process (None: leave torch's default).
    ``only_if_imported``: leave torch unimported where nothing has needed it (a server encoding
    queries with stored ONNX encoders never imports it; loading an open_clip model sets them then)."""
    if threads and (not only_if_imported or "torch" in sys.modules):
        import torch

        torch.set_num_threads(int(threads))


def set_faiss_threads(threads: int | None):
    """faiss's OpenMP threads for searches made from the calling thread (None: faiss's default)."""
    if threads:
        import faiss

        faiss.omp_set_num_threads(int(threads))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's CPU thread count for one piece of work, restored afterwards (library callers)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def prefer_hub_cache_when_offline() -> bool:
    """Switch huggingface_hub to cache-only mode if its host cannot be reached; True if offline.

    Checked once per process (the answer is remembered), and only by callers about to download
    pretrained weights."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return True
    if not hub_reachable():
        constants.HF_HUB_OFFLINE = True
        return True
    return False
