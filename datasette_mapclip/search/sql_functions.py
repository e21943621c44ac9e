"""The SQL functions, registered on every Datasette connection.

    mapclip_embed_text(text [, model])        -> float32 BLOB, unit length
    mapclip_embed_image(blob [, model])       -> float32 BLOB, unit length
    mapclip_combine(vec1, w1, vec2, w2, ...)  -> weighted sum of unit vectors, renormalised
    mapclip_similarity(a, b)                  -> cosine similarity

Their BLOBs go straight into ``vec0 ... WHERE embedding MATCH ? AND k = ?``.  Their errors say
what was wrong; ``sqlite_native`` explains how that message reaches the SQL user.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..model.clip import ModelUnavailable
from ..model.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_query_image
from ..settings import settings_of
from ..store import ModelNotFound, pick_model, vectors
from . import sqlite_native
from .query import MAX_QUERY_CHARS
from .query_vector import text_vector

log = logging.getLogger(__name__)

# The widest embedding of any CLIP model (ViT-bigG: 1,280 floats) with room to spare: a longer
# BLOB is not a vector, and is refused before it is copied or summed (one call cannot be cut short
# by Datasette's time limit, and a 100 MB zeroblob would cost a gigabyte of memory).
MAX_VECTOR_FLOATS = 4096
MAX_VECTOR_BYTES = 4 * MAX_VECTOR_FLOATS
# A text argument: the query cap in characters, at up to 4 UTF-8 bytes each (model names are short).
MAX_TEXT_BYTES = 4 * MAX_QUERY_CHARS


class SQLFunctionError(ValueError):
    """Bad arguments to a mapclip SQL function; the message reaches the SQL user."""


# -- the functions themselves -----------------------------------------------------------

def _vector(value, name: str, dim: int | None = None) -> np.ndarray:
    if value is None:
        raise SQLFunctionError(f"{name} is NULL (expected a float32 vector BLOB, e.g. from mapclip_embed_text)")
    if isinstance(value, str):
        raise SQLFunctionError(f"{name} is text, expected a float32 vector BLOB")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SQLFunctionError(f"{name} is a number, expected a float32 vector BLOB")
    if len(value) % 4 or not len(value):
        raise SQLFunctionError(f"{name} is a {len(value)}-byte BLOB, not a float32 vector (length must be a multiple of 4)")
    vector = np.frombuffer(bytes(value), dtype=vectors.FLOAT32_LE)
    if dim is not None and vector.shape[0] != dim:
        raise SQLFunctionError(f"{name} has {vector.shape[0]} floats, expected {dim}")
    if not np.isfinite(vector).all():
        raise SQLFunctionError(f"{name} contains NaN or infinite values")
    return vector.astype(np.float32)


def combine(*args) -> bytes:
    if not args or len(args) % 2:
        raise SQLFunctionError("mapclip_combine takes pairs: (vector1, weight1, vector2, weight2, ...)")
    weighted = []
    for i in range(0, len(args), 2):
        vector = _vector(args[i], f"mapclip_combine argument {i + 1}")
        weight = args[i + 1]
        if weight is None or isinstance(weight, (bytes, str)):
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise SQLFunctionError(f"mapclip_combine argument {i + 2} (a weight) is {weight!r}, expected a number") from None
        if not math.isfinite(float(weight)):
            raise SQLFunctionError(f"mapclip_combine argument {i + 2} (a weight) is {weight}, expected a finite number")
        if weighted and vector.shape != weighted[0][0].shape:
            raise SQLFunctionError(f"mapclip_combine: vectors differ in length ({weighted[0][0].shape[0]} and {vector.shape[0]} floats)")
        weighted.append((vector, weight))
    try:
        return vectors.encode(vectors.combine(weighted))
    except ValueError as error:
        raise SQLFunctionError(f"mapclip_combine: {error}") from None


def similarity(a, b) -> float:
    a = _vector(a, "mapclip_similarity argument 1")
    b = _vector(b, "mapclip_similarity argument 2", dim=a.shape[0])
    return float(vectors.unit(a) @ vectors.unit(b))  # zero vectors stay zero: similarity 0


class DatabaseFunctions:
    """Text and image embedding for one database, with the model its provenance names.

    ``models_for()`` returns the database's ``models`` rows, ``config_for()`` the plugin
    configuration, ``encoder_for(row, config)`` the server's shared encoder for a row, and
    ``run_model(fn)`` runs model work where the server runs it (its one model thread, as the search
    route does; directly where there is no server).  None of
    them may hold the connection the functions are registered on (``sqlite_native`` says why):
    ``models_for`` reads the database file through a connection of its own."""

    def __init__(self, models_for, config_for, encoder_for, run_model=lambda fn: fn()):
        self.models_for = models_for
        self.config_for = config_for
        self.encoder_for = encoder_for
        self.run_model = run_model

    def model_row(self, name=None) -> dict:
        try:
            return pick_model(self.models_for(), name, where="this database")
        except ModelNotFound as error:
            raise SQLFunctionError(str(error)) from None

    def encoder(self, name=None):
        try:
            return self.encoder_for(self.model_row(name), self.config_for())
        except ModelUnavailable as error:
            raise SQLFunctionError(str(error)) from None

    def embed_text(self, text, name=None) -> bytes:
        if text is None:
            raise SQLFunctionError("mapclip_embed_text: text is NULL")
        if isinstance(text, (bytes, bytearray, memoryview)):
            raise SQLFunctionError("mapclip_embed_text takes text; for image bytes use mapclip_embed_image")
        text = str(text).strip()
        if not text:
            raise SQLFunctionError("mapclip_embed_text: text is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise SQLFunctionError(f"mapclip_embed_text: text is {len(text)} characters, limit {MAX_QUERY_CHARS} "
                                   "(the model reads 77 tokens)")
        config = self.config_for()
        return vectors.encode(self.run_model(lambda: text_vector(self.encoder(name), text, config)))

    def max_image_bytes(self) -> int:
        """The same cap as an uploaded image's (``max_upload_bytes``)."""
        return settings_of(self.config_for()).max_upload_bytes

    def embed_image(self, data, name=None) -> bytes:
        if data is None:
            raise SQLFunctionError("mapclip_embed_image: image is NULL")
        if isinstance(data, str):
            raise SQLFunctionError("mapclip_embed_image takes image bytes (a BLOB), not text")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SQLFunctionError("mapclip_embed_image takes image bytes (a BLOB), not a number")
        encoder = self.encoder(name)
        try:
            # The same budget as an uploaded image's: a small PNG of huge dimensions is refused unread.
            settings = settings_of(self.config_for())
            image = open_query_image(bytes(data), min_size=encoder.encoder.image_size,
                                     max_pixels=min(settings.max_upload_pixels, DEFAULT_MAX_PIXELS),
                                     max_decoded_bytes=settings.max_upload_decoded_bytes)
        except ImageDecodeError as error:
            raise SQLFunctionError(f"mapclip_embed_image: {error}") from None
        return vectors.encode(self.run_model(lambda: encoder.embed_image(image)))


def _arity(name: str, func, low: int, high: int, usage: str):
    """SQLite only checks fixed argument counts; these functions take optional ones."""
    def call(*args):
        if not low <= len(args) <= high:
            raise SQLFunctionError(f"{name} takes {usage}; got {len(args)} argument{'s' if len(args) != 1 else ''}")
        return func(*args)
    return call


def function_table(functions: DatabaseFunctions) -> dict:
    """SQL name -> (python callable, number of args (-1 for any), most bytes any one argument may have)."""
    return {
        "mapclip_embed_text": (_arity("mapclip_embed_text", functions.embed_text, 1, 2, "(text [, model])"), -1,
                               MAX_TEXT_BYTES),
        "mapclip_embed_image": (_arity("mapclip_embed_image", functions.embed_image, 1, 2, "(image [, model])"), -1,
                                max(functions.max_image_bytes(), MAX_TEXT_BYTES)),
        "mapclip_combine": (combine, -1, MAX_VECTOR_BYTES),
        "mapclip_similarity": (similarity, 2, MAX_VECTOR_BYTES),
    }


# -- registration ---------------------------------------------------------------------

DETERMINISTIC = ("mapclip_combine", "mapclip_similarity")


def register(conn, functions: DatabaseFunctions) -> str:
    """Register the functions on one connection; returns "native" or "python" (the path taken)."""
    table = function_table(functions)
    try:
        if sqlite_native.register(conn, table, SQLFunctionError, deterministic=DETERMINISTIC):
            return "native"
    except Exception as error:  # any surprise: the portable path below still works
        log.warning("mapclip: native SQL function registration failed (%s); using create_function", error)
    for name, (func, nargs, max_arg_bytes) in table.items():
        conn.create_function(name, nargs, _python_wrapper(name, func, max_arg_bytes),
                             deterministic=name in DETERMINISTIC)
    return "python"


def _argument_size(value) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    return len(value) if isinstance(value, (bytes, bytearray, memoryview)) else 0


def _python_wrapper(name: str, func, max_arg_bytes: int):
    def call(*args):
        try:
            for i, value in enumerate(args):
                size = _argument_size(value)
                if size > max_arg_bytes:
                    raise SQLFunctionError(f"{name}: argument {i + 1} is {size:,} bytes, limit {max_arg_bytes:,}")
            return func(*args)
        except SQLFunctionError as error:
            log.warning("mapclip: %s", error)  # Python's sqlite3 hides the message from the SQL user
            raise
    return call
