"""The SQL functions, registered on every Datasette connection.

    mapclip_embed_text(text [, model])        -> float32 BLOB, unit length
    mapclip_embed_image(blob [, model])       -> float32 BLOB, unit length
    mapclip_combine(vec1, w1, vec2, w2, ...)  -> weighted sum of unit vectors, renormalised
    mapclip_similarity(a, b)                  -> cosine similarity

Their BLOBs go straight into ``vec0 ... WHERE embedding MATCH ? AND k = ?``.

Why not only ``conn.create_function``: Python's sqlite3 bridge turns every exception
in a user function into the fixed text "user-defined function raised exception", and these
functions must say *what* was wrong (NULL, not an image, wrong length).  Where the
connection comes from pysqlite3 (as in Datasette on Linux) they are registered through
SQLite's C API with ctypes so ``sqlite3_result_error`` carries the real message; the
handle is checked against the connection's own file name first, and anything unexpected
falls back to ``create_function``.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import sys
import threading

import numpy as np

from . import vectors
from .images import ImageDecodeError, open_image

log = logging.getLogger(__name__)


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
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


class DatabaseFunctions:
    """Text and image embedding for one database, with the model its provenance names."""

    def __init__(self, models_for, config_for):
        self.models_for = models_for  # () -> list of models rows
        self.config_for = config_for  # () -> plugin config dict

    def model_row(self, name=None) -> dict:
        rows = self.models_for()
        if not rows:
            raise SQLFunctionError("this database has no mapclip models table: load it with `mapclip load ...` first")
        if name is None:
            return sorted(rows, key=lambda r: (-r["is_default"], r["id"]))[0]
        for row in rows:
            if row["name"] == name:
                return row
        raise SQLFunctionError(f"no model {name!r} in this database; models: {', '.join(r['name'] for r in rows)}")

    def encoder(self, name=None):
        from .encoders import encoder_for
        from .model import ModelUnavailable

        try:
            return encoder_for(self.model_row(name), self.config_for())
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
        template = self.config_for().get("prompt_template") or "{}"
        return vectors.encode(self.encoder(name).embed_text(template.format(text)))

    def embed_image(self, data, name=None) -> bytes:
        if data is None:
            raise SQLFunctionError("mapclip_embed_image: image is NULL")
        if isinstance(data, str):
            raise SQLFunctionError("mapclip_embed_image takes image bytes (a BLOB), not text")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SQLFunctionError("mapclip_embed_image takes image bytes (a BLOB), not a number")
        encoder = self.encoder(name)
        try:
            image = open_image(bytes(data), min_size=encoder.encoder.image_size)
        except ImageDecodeError as error:
            raise SQLFunctionError(f"mapclip_embed_image: {error}") from None
        return vectors.encode(encoder.embed_image(image))


def function_table(functions: DatabaseFunctions) -> dict:
    """SQL name -> (python callable, number of args; -1 for any)."""
    return {
        "mapclip_embed_text": (functions.embed_text, -1),
        "mapclip_embed_image": (functions.embed_image, -1),
        "mapclip_combine": (combine, -1),
        "mapclip_similarity": (similarity, 2),
    }


# -- registration ---------------------------------------------------------------------

def register(conn, functions: DatabaseFunctions):
    table = function_table(functions)
    if _Native.available(conn):
        try:
            _Native.register(conn, table)
            return "native"
        except Exception as error:  # any surprise: fall back to the portable path
            log.warning("mapclip: native SQL function registration failed (%s); using create_function", error)
    for name, (func, nargs) in table.items():
        conn.create_function(name, nargs, _python_wrapper(func), deterministic=name != "mapclip_embed_text")
    return "python"


def _python_wrapper(func):
    def call(*args):
        try:
            return func(*args)
        except SQLFunctionError as error:
            log.warning("mapclip: %s", error)
            raise
    return call


SQLITE_UTF8 = 1
SQLITE_DETERMINISTIC = 0x800
SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL = 1, 2, 3, 4, 5
SQLITE_TRANSIENT = ctypes.c_void_p(-1)
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p))


class _Native:
    """SQLite C API through ctypes, for connections made by pysqlite3 (SQLite linked in)."""

    lib = None
    functions: dict[int, object] = {}
    counter = itertools.count(1)
    lock = threading.Lock()

    @classmethod
    def _library(cls):
        if cls.lib is None:
            module = sys.modules.get("pysqlite3._sqlite3")
            if module is None:
                return None
            lib = ctypes.CDLL(module.__file__)
            lib.sqlite3_db_filename.restype = ctypes.c_char_p
            lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.sqlite3_create_function_v2.argtypes = [
                ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                _CALLBACK, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ]
            lib.sqlite3_user_data.restype = ctypes.c_void_p
            lib.sqlite3_user_data.argtypes = [ctypes.c_void_p]
            lib.sqlite3_value_type.argtypes = [ctypes.c_void_p]
            lib.sqlite3_value_bytes.argtypes = [ctypes.c_void_p]
            lib.sqlite3_value_blob.restype = ctypes.c_void_p
            lib.sqlite3_value_blob.argtypes = [ctypes.c_void_p]
            lib.sqlite3_value_text.restype = ctypes.c_void_p
            lib.sqlite3_value_text.argtypes = [ctypes.c_void_p]
            lib.sqlite3_value_double.restype = ctypes.c_double
            lib.sqlite3_value_double.argtypes = [ctypes.c_void_p]
            lib.sqlite3_value_int64.restype = ctypes.c_int64
            lib.sqlite3_value_int64.argtypes = [ctypes.c_void_p]
            lib.sqlite3_result_blob.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
            lib.sqlite3_result_double.argtypes = [ctypes.c_void_p, ctypes.c_double]
            lib.sqlite3_result_null.argtypes = [ctypes.c_void_p]
            lib.sqlite3_result_error.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
            cls.lib = lib
        return cls.lib

    @classmethod
    def handle(cls, conn):
        """The ``sqlite3*`` of a pysqlite3 connection: the first field after the object header,
        accepted only if SQLite agrees it is this connection's database file."""
        if not type(conn).__module__.startswith("pysqlite3"):
            return None
        lib = cls._library()
        if lib is None:
            return None
        pointer = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not pointer:
            return None
        filename = lib.sqlite3_db_filename(pointer, b"main")
        expected = conn.execute("SELECT file FROM pragma_database_list WHERE name = 'main'").fetchone()[0]
        if (filename or b"").decode() != (expected or ""):
            return None
        return pointer

    @classmethod
    def available(cls, conn) -> bool:
        try:
            return cls.handle(conn) is not None
        except Exception:
            return False

    @classmethod
    def register(cls, conn, table):
        lib = cls._library()
        handle = cls.handle(conn)
        for name, (func, nargs) in table.items():
            with cls.lock:
                key = next(cls.counter)
                cls.functions[key] = func
            flags = SQLITE_UTF8 | (SQLITE_DETERMINISTIC if name in ("mapclip_combine", "mapclip_similarity") else 0)
            code = lib.sqlite3_create_function_v2(handle, name.encode(), nargs, flags, ctypes.c_void_p(key),
                                                  _native_callback, None, None, None)
            if code != 0:
                raise RuntimeError(f"sqlite3_create_function_v2({name}) returned {code}")


def _read_value(lib, value):
    kind = lib.sqlite3_value_type(value)
    if kind == SQLITE_NULL:
        return None
    if kind == SQLITE_INTEGER:
        return lib.sqlite3_value_int64(value)
    if kind == SQLITE_FLOAT:
        return lib.sqlite3_value_double(value)
    if kind == SQLITE_BLOB:
        size = lib.sqlite3_value_bytes(value)
        pointer = lib.sqlite3_value_blob(value)
        return ctypes.string_at(pointer, size) if size else b""
    pointer = lib.sqlite3_value_text(value)
    size = lib.sqlite3_value_bytes(value)
    return ctypes.string_at(pointer, size).decode("utf-8", "replace")


@_CALLBACK
def _native_callback(context, argc, argv):
    lib = _Native.lib
    try:
        func = _Native.functions[lib.sqlite3_user_data(context)]
        args = [_read_value(lib, argv[i]) for i in range(argc)]
        result = func(*args)
        if result is None:
            lib.sqlite3_result_null(context)
        elif isinstance(result, bytes):
            lib.sqlite3_result_blob(context, result, len(result), SQLITE_TRANSIENT)
        else:
            lib.sqlite3_result_double(context, float(result))
    except SQLFunctionError as error:
        message = str(error).encode()
        lib.sqlite3_result_error(context, message, len(message))
    except BaseException as error:  # never let an exception cross the C boundary
        message = f"{type(error).__name__}: {error}".encode()
        lib.sqlite3_result_error(context, message, len(message))
