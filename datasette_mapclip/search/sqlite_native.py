"""SQL functions registered through SQLite's C API (ctypes), so their errors say what was wrong.

Why this module exists: Python's sqlite3 bridge turns every exception raised in a
``create_function`` callback into the fixed text "user-defined function raised exception", and
the mapclip SQL functions must tell the SQL user *what* was wrong (NULL, not an image, wrong
length).  Where a connection comes from pysqlite3 (SQLite linked into its extension module, as
Datasette uses on Linux), ``sqlite3_create_function_v2`` is called directly and
``sqlite3_result_error`` carries the message.  Everywhere else ``register`` returns False and the
caller uses ``create_function``.

What keeps it from ever crashing the process (every check happens before a pointer is used):

- the connection must be a pysqlite3 ``Connection`` (exact module), open, whose type's instance
  size covers the ``sqlite3 *db`` field that follows the object header (CPython's layout since 2.5);
- the candidate pointer must be non-null, readable (probed through ``/proc/self/mem``, which
  answers an error instead of faulting; where it does not exist, the native path is not used), and
  start with the default VFS pointer, as every ``sqlite3`` object opened without a custom VFS does;
- SQLite itself must then name the same database file as the connection does.

Per-connection state, owned by the connection: each registration is a ``_Registration`` object
that the connection itself keeps alive, through an ordinary ``create_function`` (pysqlite3 drops
its reference when the connection closes or is freed), and that this module frees once the
connection has let go (``_release_detached``: pysqlite3 may let go without the GIL).  The native functions get the address of
their ``_NativeFunction`` entry, inside that object, as SQLite user data, and pass no destroy
callback.  Why not a module-level table emptied by a destroy callback: the table kept every
connection whose functions refer to it alive (Datasette 0.65 drops the ``:memory:`` connection of
every ``/-/versions`` request unclosed: a leak any visitor could grow), and a Python destroy
callback runs inside whatever allocation the garbage collector picked to free a connection, where
it can clear the exception being raised ("error return without exception set") or wait for a
thread that is shutting down.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import os
import struct
import sys
import threading

log = logging.getLogger(__name__)

SQLITE_OK = 0
SQLITE_UTF8 = 1
SQLITE_DETERMINISTIC = 0x800
SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL = 1, 2, 3, 4, 5
SQLITE_TRANSIENT = ctypes.c_void_p(-1)
POINTER_SIZE = ctypes.sizeof(ctypes.c_void_p)

_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p))

_keys = itertools.count(1)
# Every registration, held here too, with its address: see _release_detached.
_held: list = []
_held_addresses: list[int] = []
_held_sizes: list[int] = []
_held_lock = threading.Lock()
_library = None


@dataclasses.dataclass(eq=False)
class _NativeFunction:
    name: str
    func: object
    message_error: type
    max_arg_bytes: int


class _Registration:
    """One connection's native functions.  The connection holds it (as a zero-argument SQL
    function that returns NULL), and this module holds it too until the connection lets go."""

    __slots__ = ("functions",)

    def __init__(self, functions: list[_NativeFunction]):
        self.functions = functions

    def __call__(self):
        return None


def _references(address: int) -> int:
    """An object's reference count, read from its header without touching the object."""
    return ctypes.c_ssize_t.from_address(address).value


def _release_detached() -> None:
    """Free, here and with the GIL, the registrations their connection has let go of.

    Why not let the connection free them: pysqlite3 drops a function's reference in a destroy
    callback that runs without the GIL when SQLite completes a deferred close (a connection freed
    while a statement was alive is closed by the last ``sqlite3_finalize``, which pysqlite3 calls
    with the GIL released, for instance while the garbage collector frees a cursor in a Datasette
    SQL thread).  Freeing the object there aborts the process ("PyThreadState_Get: the function
    must be called with the GIL held").  So the connection's reference is never the last one: a
    registration whose count has fallen to this module's own reference is detached, and is freed
    here.  The count is read without taking a reference, so the callback's unlocked decrement
    never races with an increment of ours."""
    with _held_lock:
        detached = [i for i, address in enumerate(_held_addresses) if _references(address) <= 1]
        for i in reversed(detached):  # ``del`` moves the others' pointers without touching them
            del _held[i]
            del _held_addresses[i]
            del _held_sizes[i]


def registered_count() -> int:
    """How many native functions are registered on connections that are still alive."""
    _release_detached()
    with _held_lock:
        return sum(_held_sizes)


def _sqlite_library():
    """The SQLite that pysqlite3 links in, with the argument types of the calls used here."""
    global _library
    if _library is not None:
        return _library
    module = sys.modules.get("pysqlite3._sqlite3")
    if module is None or not getattr(module, "__file__", None):
        return None
    lib = ctypes.CDLL(module.__file__)
    signatures = {
        "sqlite3_db_filename": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_char_p]),
        "sqlite3_vfs_find": (ctypes.c_void_p, [ctypes.c_char_p]),
        "sqlite3_create_function_v2": (ctypes.c_int, [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
            _FUNCTION, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        "sqlite3_user_data": (ctypes.c_void_p, [ctypes.c_void_p]),
        "sqlite3_value_type": (ctypes.c_int, [ctypes.c_void_p]),
        "sqlite3_value_bytes": (ctypes.c_int, [ctypes.c_void_p]),
        "sqlite3_value_blob": (ctypes.c_void_p, [ctypes.c_void_p]),
        "sqlite3_value_text": (ctypes.c_void_p, [ctypes.c_void_p]),
        "sqlite3_value_double": (ctypes.c_double, [ctypes.c_void_p]),
        "sqlite3_value_int64": (ctypes.c_int64, [ctypes.c_void_p]),
        "sqlite3_result_blob": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]),
        "sqlite3_result_double": (None, [ctypes.c_void_p, ctypes.c_double]),
        "sqlite3_result_int64": (None, [ctypes.c_void_p, ctypes.c_int64]),
        "sqlite3_result_null": (None, [ctypes.c_void_p]),
        "sqlite3_result_error": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    _library = lib
    return lib


def _read_memory(address: int, size: int) -> bytes | None:
    """``size`` bytes at ``address`` of this process, or None if unreadable (never faults)."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, address)
    except (OSError, OverflowError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def connection_handle(conn) -> int | None:
    """The ``sqlite3*`` behind a pysqlite3 connection, or None wherever any check fails."""
    connection_type = type(conn)
    if not any(cls.__module__ == "pysqlite3.dbapi2" and cls.__name__ == "Connection"
               for cls in connection_type.__mro__):
        return None
    lib = _sqlite_library()
    if lib is None:
        return None
    if connection_type.__basicsize__ < object.__basicsize__ + POINTER_SIZE:
        return None
    try:
        expected = conn.execute("SELECT file FROM pragma_database_list WHERE name = 'main'").fetchone()[0] or ""
    except Exception:  # closed, or not usable: nothing to register on
        return None
    field = _read_memory(id(conn) + object.__basicsize__, POINTER_SIZE)
    if field is None:
        return None
    (pointer,) = struct.unpack("P", field)
    if not pointer:
        return None
    default_vfs = lib.sqlite3_vfs_find(None)
    first_field = _read_memory(pointer, POINTER_SIZE)  # sqlite3.pVfs
    if not default_vfs or first_field is None or struct.unpack("P", first_field)[0] != default_vfs:
        return None
    filename = lib.sqlite3_db_filename(pointer, b"main")
    if (filename or b"").decode("utf-8", "replace") != expected:
        return None
    return pointer


def register(conn, functions: dict, message_error: type[BaseException], deterministic=()) -> bool:
    """Register ``{sql name: (callable, n_args, max_arg_bytes)}`` natively; False (nothing
    registered) if this connection cannot take the native path.  An argument longer than
    ``max_arg_bytes`` is refused before it is read (SQLite knows a value's size without copying
    it, even a ``zeroblob``), so one call can never copy a huge value.  Exceptions of type
    ``message_error`` become the SQL error text as they are; any other exception is reported with
    its type name.  The callables must not refer to ``conn``: the registry below would keep the
    connection alive, and a connection dropped without ``close()`` would never be freed."""
    try:
        handle = connection_handle(conn)
    except Exception as error:
        log.warning("mapclip: native SQL functions unavailable (%s); using create_function", error)
        return False
    if handle is None:
        return False
    lib = _library
    entries = {name: _NativeFunction(name, func, message_error, max_arg_bytes)
               for name, (func, nargs, max_arg_bytes) in functions.items()}
    registration = _Registration(list(entries.values()))
    # First the owner, so every address handed to SQLite below stays valid while it can be called;
    # a name of its own each time, so registering again never frees what earlier functions point to.
    _release_detached()
    with _held_lock:
        _held.append(registration)
        _held_addresses.append(id(registration))
        _held_sizes.append(len(entries))
    conn.create_function(f"mapclip_native_registration_{next(_keys)}", 0, registration)
    for name, (func, nargs, max_arg_bytes) in functions.items():
        flags = SQLITE_UTF8 | (SQLITE_DETERMINISTIC if name in deterministic else 0)
        code = lib.sqlite3_create_function_v2(handle, name.encode(), nargs, flags, ctypes.c_void_p(id(entries[name])),
                                              _call, None, None, None)
        if code != SQLITE_OK:
            raise RuntimeError(f"sqlite3_create_function_v2({name}) returned {code}")
    return True


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
        return ctypes.string_at(pointer, size) if size and pointer else b""
    pointer = lib.sqlite3_value_text(value)
    size = lib.sqlite3_value_bytes(value)
    return ctypes.string_at(pointer, size).decode("utf-8", "replace") if pointer else ""


def _error(lib, context, text: str):
    message = text.encode("utf-8", "replace")
    lib.sqlite3_result_error(context, message, len(message))


@_FUNCTION
def _call(context, argc, argv):
    lib = _library
    try:
        address = lib.sqlite3_user_data(context)
        if not address:
            _error(lib, context, "mapclip: this SQL function has no registration")
            return
        # The _Registration that owns this entry lives as long as the connection running this call.
        entry = ctypes.cast(address, ctypes.py_object).value
        name, func, message_error, max_arg_bytes = entry.name, entry.func, entry.message_error, entry.max_arg_bytes
        if argc < 0 or (argc and not argv):
            _error(lib, context, "mapclip: SQLite passed no arguments")
            return
        for i in range(argc):
            if lib.sqlite3_value_type(argv[i]) not in (SQLITE_BLOB, SQLITE_TEXT):
                continue  # asking a number's size would turn it into text
            size = lib.sqlite3_value_bytes(argv[i])
            if size > max_arg_bytes:
                _error(lib, context, f"{name}: argument {i + 1} is {size:,} bytes, limit {max_arg_bytes:,}")
                return
        try:
            result = func(*[_read_value(lib, argv[i]) for i in range(argc)])
        except message_error as error:
            _error(lib, context, str(error))
            return
        if result is None:
            lib.sqlite3_result_null(context)
        elif isinstance(result, (bytes, bytearray)):
            lib.sqlite3_result_blob(context, bytes(result), len(result), SQLITE_TRANSIENT)
        elif isinstance(result, int) and not isinstance(result, bool):
            lib.sqlite3_result_int64(context, result)
        else:
            lib.sqlite3_result_double(context, float(result))
    except BaseException as error:  # never let an exception cross the C boundary
        _error(lib, context, f"{type(error).__name__}: {error}")


# SQLite keeps a pointer to this callback for as long as any connection lives, and connections
# can outlive this module's globals while the interpreter shuts down; one extra reference keeps
# the ctypes thunk from being freed under SQLite's feet.
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_call))
