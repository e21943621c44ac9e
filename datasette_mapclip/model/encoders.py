"""One encoder per model per server, chosen by what a database's provenance records.

A database says which model made its vectors (``models`` table); text and uploaded images
must be embedded with that same model, never another one.  A model made from a checkpoint is
found by its SHA-256, never by the loading machine's directory (``provenance.py``): plugin
configuration names a copy of the weights, else this machine's checkpoint registry (filled by
the loaders); either is accepted only if its SHA-256 matches the recorded one.

    plugins:
      datasette-mapclip:
        checkpoints:
          "mapclip-tiny/sha256:0dbfd98a5af1": /srv/models/demo.pt   # or keyed by the SHA-256
        threads: 1          # torch threads (set at start-up; a web server should not oversubscribe)
        text_cache_size: 4096
        prompt_template: "{}"   # e.g. "a {} map", the seed's trick
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import threading
import time
from pathlib import Path

import numpy as np

from ..runtime import prefer_hub_cache_when_offline, set_torch_threads
from ..settings import settings_of
from .clip import ClipEncoder, ModelSpec, ModelUnavailable, file_sha256, import_open_clip, load_encoder
from .provenance import is_sha256, recorded_file_name, remembered_checkpoints
from .query_encoders import QueryEncoder, QueryEncodersUnavailable


class SharedEncoder:
    """A loaded encoder shared by every request, plus an LRU cache of text embeddings.

    torch modules are safe to call from several threads in inference mode; a lock keeps
    one encode at a time so two requests do not fight over the same cores (a 2-thread encode
    fell from 60 ms to ~1 s under contention on a 2-core machine).
    """

    def __init__(self, encoder: ClipEncoder, text_cache_size: int = 4096):
        self.encoder = encoder
        self.encode_lock = threading.Lock()
        self.cache_lock = threading.Lock()
        self.text_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.text_cache_size = text_cache_size

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        """Several texts, the uncached ones in one forward pass (queries that arrived together)."""
        found: dict[str, np.ndarray] = {}
        with self.cache_lock:
            for text in texts:
                cached = self.text_cache.get(text)
                if cached is not None:
                    self.text_cache.move_to_end(text)
                    found[text] = cached
        missing = list(dict.fromkeys(text for text in texts if text not in found))
        if missing:
            with self.encode_lock:
                encoded = self.encoder.encode_texts(missing)
            with self.cache_lock:
                for text, vector in zip(missing, encoded):
                    self.text_cache[text] = found[text] = vector
                while len(self.text_cache) > self.text_cache_size:
                    self.text_cache.popitem(last=False)
        return [found[text] for text in texts]

    def embed_image(self, image) -> np.ndarray:
        with self.encode_lock:
            return self.encoder.encode_images([image])[0]


def configured_checkpoint(model_row: dict, config: dict) -> str | None:
    """The ``checkpoints:`` entry for a model: keyed by its name, its SHA-256 (with or without
    ``sha256:``) or the SHA-256's first 12 hex digits, in that order of preference."""
    configured = settings_of(config).checkpoints or {}
    digest = (model_row.get("checkpoint_sha256") or "").lower()
    for key in (model_row["name"], digest, f"sha256:{digest}", digest[:12], f"sha256:{digest[:12]}"):
        value = configured.get(key)
        if key and value:
            return str(value)
    return None


def checkpoint_candidates(model_row: dict, config: dict) -> list[tuple[str, str]]:
    """(path, where it came from) for each place the weights of a recorded model may be.

    The path a ``models`` row may hold (only a file name in new databases, the loading
    machine's absolute path in old ones) is never among them: a database is not trusted to
    name files on the server, and that directory rarely exists there."""
    candidates = []
    configured = configured_checkpoint(model_row, config)
    if configured:
        candidates.append((os.path.abspath(os.path.expanduser(configured)), "configured"))
    for path in remembered_checkpoints(model_row["checkpoint_sha256"].lower()):
        if all(path != seen for seen, _ in candidates):
            candidates.append((path, "this machine's checkpoint registry"))
    return candidates


def resolve_checkpoint(model_row: dict, config: dict) -> str | None:
    """The local weights file for a recorded model, checked by hash, or None for a pretrained tag."""
    recorded_hash = model_row.get("checkpoint_sha256")
    if not recorded_hash:
        return None
    if not is_sha256(str(recorded_hash).lower()):
        raise ModelUnavailable(f"model {model_row['name']} records a checkpoint SHA-256 that is not one")
    recorded_hash = recorded_hash.lower()
    tried = []
    for path, source in checkpoint_candidates(model_row, config):
        if not Path(path).is_file():
            tried.append(f"{path} ({source}: missing)")
            continue
        if file_sha256(path) != recorded_hash:
            tried.append(f"{path} ({source}: different weights, SHA-256 does not match)")
            continue
        return str(path)
    file_name = recorded_file_name(model_row.get("checkpoint_path"))
    recorded = f"SHA-256 {recorded_hash}" + (f", loaded from a file named {file_name}" if file_name else "")
    raise ModelUnavailable(
        f"the weights of model {model_row['name']} ({recorded}) were not found on this server; tried: "
        f"{'; '.join(tried) or 'nothing'}. Point plugins.datasette-mapclip.checkpoints."
        f"\"{model_row['name']}\" at a copy of the checkpoint in metadata.yml."
    )


class EncoderCache:
    """The encoders one server has loaded, keyed by provenance, each loaded once.

    A model that could not be loaded is remembered for ``retry_after`` seconds, so a broken
    configuration answers at once instead of re-reading weights on every request, and a fixed
    one (weights copied in, configuration corrected) is picked up without a restart."""

    def __init__(self, retry_after: float = 60.0):
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._encoders: dict[tuple, SharedEncoder] = {}
        self._failures: dict[tuple, tuple[float, str]] = {}

    def get(self, model_row: dict, config: dict | None = None, stored=None) -> SharedEncoder:
        """The encoder for a ``models`` row; ModelUnavailable (with advice) if it cannot be had.

        ``stored``: the query encoders the collection file carries for this model
        (``store.StoredQueryEncoders``); where it has a complete set they answer (ONNX Runtime, no
        torch), unless the ``query_encoders`` setting says "torch"."""
        config = config or {}
        stored_key = stored.key() if stored is not None and settings_of(config).query_encoders == "stored" else None
        if stored_key is not None:
            # each file's own: a damaged file's failure is its alone, and it never borrows another's
            key = failure_key = ("stored", stored.path, *stored_key)
            load = functools.partial(self._load_stored, model_row, config, stored)
        else:
            key = failure_key = (model_row["architecture"], model_row.get("pretrained"),
                                 model_row.get("checkpoint_sha256"))
            load = functools.partial(self._load, model_row, config)
        encoder = self._encoders.get(key)
        if encoder is not None:
            return encoder
        with self._lock:
            if key in self._encoders:
                return self._encoders[key]
            failed = self._failures.get(failure_key)
            if failed and time.monotonic() - failed[0] < self.retry_after:
                raise ModelUnavailable(failed[1])
            try:
                loaded = load()
            except ModelUnavailable as error:
                message = f"model {model_row['name']} cannot be loaded: {error}"
                self._failures[failure_key] = (time.monotonic(), message)
                raise ModelUnavailable(message) from None
            self._failures.pop(failure_key, None)
            self._encoders[key] = SharedEncoder(loaded, settings_of(config).text_cache_size)
            return self._encoders[key]

    @staticmethod
    def _load_stored(model_row: dict, config: dict, stored) -> QueryEncoder:
        try:
            # the image tower is read at the first image query, the text tower beside the tokenizer's parse
            parts, precisions = stored.parts(lazy=("image", "text"))
            loaded = QueryEncoder(parts, precisions, threads=settings_of(config).threads)
        except QueryEncodersUnavailable as error:
            raise ModelUnavailable(str(error)) from None
        except Exception as error:  # a damaged or altered file: say so; the file is at fault, not the request
            raise ModelUnavailable(f"its stored query encoders cannot be read: {type(error).__name__}: {error}") from None
        if loaded.dim != model_row["dim"]:
            raise ModelUnavailable(f"its stored encoders give {loaded.dim}-d vectors, the database holds {model_row['dim']}-d")
        return loaded

    @staticmethod
    def _load(model_row: dict, config: dict) -> ClipEncoder:
        # the checkpoint's hash is checked while torch and open_clip import (~0.4 s of ViT-B-32's start-up)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mapclip-hash") as pool:
            found = pool.submit(resolve_checkpoint, model_row, config)
            import_open_clip()
            checkpoint = found.result()
        if not checkpoint:
            prefer_hub_cache_when_offline()
        set_torch_threads(settings_of(config).threads)  # in the model thread, where it encodes
        spec = ModelSpec(model_row["architecture"], None if checkpoint else model_row.get("pretrained"), checkpoint)
        loaded = load_encoder(spec, precision=settings_of(config).precision,
                              checkpoint_sha256=model_row.get("checkpoint_sha256") if checkpoint else None)
        if loaded.dim != model_row["dim"]:
            raise ModelUnavailable(f"it gives {loaded.dim}-d vectors, the database holds {model_row['dim']}-d")
        return loaded

    def forget(self):
        """Drop loaded encoders and remembered failures."""
        with self._lock:
            self._encoders.clear()
            self._failures.clear()
