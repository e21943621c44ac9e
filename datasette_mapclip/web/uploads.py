"""Read a multipart upload safely: capped while it streams, parsed off the event loop, nothing on disk.

Datasette 0.65 has no multipart parser of its own; python-multipart (Starlette's parser) does the
parsing.  The body is received on the event loop (cheap: only bytes are counted, and an oversized
body is refused as soon as it passes the cap), then parsed in a worker thread with limits on the
number of parts and the size of each part's headers and text fields, so a body of 150,000 tiny
parts is refused after a few dozen instead of holding the event loop while it is picked apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.parse

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import FormParser, MultipartParser, parse_options_header

from ..search.errors import UploadError
from ..settings import DECLARED, settings_of
from ..store import ids

DEFAULT_MAX_UPLOAD_BYTES = DECLARED["max_upload_bytes"].default
# Room for the form's own fields and the multipart framing around the image.
FORM_OVERHEAD_BYTES = 64 * 1024
# Where limit_upload_bodies leaves the reason it cut a body short, for the view to answer with.
REFUSED_KEY = "mapclip.upload_refused"


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """Caps on one upload; ``max_upload_bytes`` in the plugin configuration sets ``max_bytes``."""

    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # the image (and the whole body, plus FORM_OVERHEAD_BYTES)
    max_parts: int = 64  # the search form: about a dozen fields, and up to 12 term rows of two
    max_field_bytes: int = 16 * 1024  # a text field (q is capped at 1000 characters anyway)
    max_header_bytes: int = 8 * 1024  # one part's headers together

    @classmethod
    def from_config(cls, config: dict) -> "UploadLimits":
        return cls(max_bytes=settings_of(config).max_upload_bytes)


async def read_multipart(request, limits: UploadLimits = UploadLimits()) -> tuple[dict, dict]:
    """-> (form fields as str, or a list of str for a field sent more than once, files as
    {field: (filename, bytes)}); UploadError says what was wrong."""
    boundary = _boundary(request.headers.get("content-type", ""))
    body = await _receive_body(request, limits)
    refused = request.scope.get(REFUSED_KEY)
    if refused:  # cut short by limit_upload_bodies
        raise refused[0]
    return await asyncio.to_thread(parse_multipart, body, boundary, limits)


def _boundary(content_type: str) -> bytes:
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UploadError("send the image as multipart/form-data (an HTML file upload)", 415)
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary", 400)
    return boundary


def _too_many_parts(limits: UploadLimits) -> UploadError:
    return UploadError(f"too many parts in the form: more than {limits.max_parts}")


def _too_large(limits: UploadLimits) -> UploadError:
    return UploadError(f"upload too large: over the {limits.max_bytes / 1e6:.1f} MB limit", 413)


async def _receive_body(request, limits: UploadLimits) -> bytes:
    cap = limits.max_bytes + FORM_OVERHEAD_BYTES
    declared = ids.declared_length(request.headers.get("content-length", ""))
    if declared is not None and declared > cap:
        raise UploadError(f"upload too large: {declared / 1e6:.1f} MB, limit {limits.max_bytes / 1e6:.1f} MB", 413)
    body = bytearray()
    while True:
        message = await request.receive()
        body += message.get("body", b"")
        if len(body) > cap:
            raise _too_large(limits)
        if not message.get("more_body"):
            return bytes(body)


def parse_multipart(body: bytes, boundary: bytes, limits: UploadLimits = UploadLimits()) -> tuple[dict, dict]:
    """Parse a whole multipart body (in a worker thread) within ``limits``."""
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    part = {}
    count = 0

    def on_part_begin():
        nonlocal count
        count += 1
        if count > limits.max_parts:
            raise _too_many_parts(limits)
        part.update(data=bytearray(), headers={}, header_field=b"", header_value=b"", header_bytes=0)

    def on_header_field(data, start, end):
        part["header_field"] += data[start:end]
        _count_header_bytes(end - start)

    def on_header_value(data, start, end):
        part["header_value"] += data[start:end]
        _count_header_bytes(end - start)

    def _count_header_bytes(n):
        part["header_bytes"] += n
        if part["header_bytes"] > limits.max_header_bytes:
            raise UploadError(f"a form part's headers are too long: over {limits.max_header_bytes} bytes")

    def on_header_end():
        part["headers"][part["header_field"].lower()] = part["header_value"]
        part["header_field"], part["header_value"] = b"", b""

    def on_headers_finished():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["name"] = (disposition.get(b"name") or b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        part["filename"] = None if filename is None else filename.decode("utf-8", "replace")

    def on_part_data(data, start, end):
        part["data"] += data[start:end]
        if part["filename"] is None and len(part["data"]) > limits.max_field_bytes:
            raise UploadError(f"form field {part['name'][:40]!r} is too long: over {limits.max_field_bytes} bytes")
        if len(part["data"]) > limits.max_bytes:
            raise _too_large(limits)

    def on_part_end():
        if part["filename"] is not None:
            files[part["name"]] = (part["filename"], bytes(part["data"]))
        else:  # a field sent more than once (a form's repeated term rows) keeps every value, in order
            value = part["data"].decode("utf-8", "replace")
            earlier = fields.get(part["name"])
            fields[part["name"]] = value if earlier is None else (
                [*earlier, value] if isinstance(earlier, list) else [earlier, value])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as error:
        raise UploadError(f"the multipart/form-data body is malformed: {error}") from None
    return fields, files


class _BodyCounter:
    """Counts a streaming body's bytes and multipart delimiters without parsing it (C-speed
    ``bytes.count``), so the limits hold before anything, Datasette's CSRF check included, parses it."""

    def __init__(self, boundary: bytes, limits: UploadLimits):
        self.delimiter = b"--" + boundary
        self.limits = limits
        self.size = 0
        self.parts = 0
        self.tail = b""

    def add(self, chunk: bytes) -> UploadError | None:
        """-> why the body is refused, or None."""
        self.size += len(chunk)
        if self.size > self.limits.max_bytes + FORM_OVERHEAD_BYTES:
            return _too_large(self.limits)
        window = self.tail + chunk
        self.parts += window.count(self.delimiter) - self.tail.count(self.delimiter)
        self.tail = window[-(len(self.delimiter) - 1):]
        if self.parts > self.limits.max_parts + 1:  # n parts have n + 1 delimiters
            return _too_many_parts(self.limits)
        return None


# --- what Datasette 0.65's CSRF layer (asgi-csrf 0.11) does with a multipart body -----------------
# For any method but GET, HEAD, OPTIONS and TRACE, on any path, when the request carries a cookie and
# no "Authorization: Bearer", asgi-csrf takes the boundary as ``content_type.split(b"; boundary=")[1]``
# and feeds the body, as it arrives, to python-multipart's FormParser until the ``csrftoken`` field
# is complete (then it compares it) or a file part receives data (then it answers 403).  Everything
# else that goes wrong on the way escapes as a 500: the boundary spelled any other way (IndexError,
# or a wrong boundary and a parse error), a malformed body, bad base64 in a part, a token that is
# not UTF-8, a file part that ends empty before the token (its stand-in file has no finalize()).
_CSRF_UNCHECKED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CANONICAL_MULTIPART = "multipart/form-data; boundary=..."


def _csrf_layer_reads_body(scope, headers: dict) -> bool:
    return (scope["method"] not in _CSRF_UNCHECKED_METHODS and bool(headers.get(b"cookie"))
            and not headers.get(b"authorization", b"").startswith(b"Bearer "))


def _content_type(raw: bytes) -> tuple[bytes, bytes | None]:
    """A Content-Type header -> (its media type, lower case; the boundary parameter or None), parsed
    the standard way (python-multipart uses email.message): parameter names in any case, optional
    whitespace, quoted values.  A header it cannot parse has no media type."""
    try:
        mime, options = parse_options_header(raw.decode("latin-1"))
    except (ValueError, AssertionError, UnicodeError):
        return b"", None
    return mime.strip().lower(), options.get(b"boundary")


def _csrf_content_type_problem(raw: bytes, boundary: bytes | None) -> str | None:
    """Why the CSRF layer could not read this multipart content type, or None."""
    if not boundary:
        return "multipart/form-data without a boundary"
    pieces = raw.split(b"; boundary=")
    if raw.split(b";", 1)[0] != b"multipart/form-data" or len(pieces) < 2 or pieces[1] != boundary:
        return (f"write the Content-Type header exactly as {CANONICAL_MULTIPART!r}: lower case, one space "
                "after the semicolon, the boundary unquoted and last (Datasette's CSRF check reads it that way)")
    return None


class _TokenFound(Exception):
    pass


class _FileFirst(Exception):
    pass


class _Unreadable(Exception):
    pass


class _FileProbe:
    """Stands in for asgi-csrf's file class: data in a file part before the token ends its reading."""

    def __init__(self, file_name, field_name, config=None):
        pass

    def write(self, data):
        raise _FileFirst

    def finalize(self):  # reached only by a file part that ended without data
        raise _Unreadable("an empty file part comes before the csrftoken field: send csrftoken first")


class _CsrfBodyCheck:
    """Reads a multipart body as the CSRF layer will, as far as it will, and says why it would fail
    with an error (a 500) instead of an answer: the same parser, fed the same chunks, stopping
    where it stops."""

    def __init__(self, boundary: bytes):
        self.done = False
        self.parser = FormParser("multipart/form-data", self._on_field, None, boundary=boundary,
                                 FileClass=_FileProbe)

    @staticmethod
    def _on_field(field):
        if field.field_name == b"csrftoken":
            try:
                (field.value or b"").decode("utf-8")
            except UnicodeDecodeError:
                raise _Unreadable("the csrftoken field is not UTF-8 text") from None
            raise _TokenFound

    def feed(self, chunk: bytes) -> str | None:
        """-> why this chunk makes the body unreadable, or None."""
        if self.done:
            return None
        try:
            self.parser.write(chunk)
        except (_TokenFound, _FileFirst):  # the CSRF layer answers these itself
            self.done = True
        except _Unreadable as error:
            self.done = True
            return str(error)
        except Exception as error:  # whatever the parser raises, the CSRF layer would raise
            self.done = True
            return f"the multipart/form-data body is malformed: {str(error)[:200] or type(error).__name__}"
        return None


async def _answer(scope, send, message: str, status: int = 400):
    """The wrapper's own 4xx, in the route's format; the rest of the body is never read."""
    if scope["path"].endswith(".json"):
        body, content_type = json.dumps({"ok": False, "error": message, "status": status}), b"application/json"
    else:
        body, content_type = message, b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body.encode("utf-8")})


def _urlencoded_problem(body: bytes) -> str | None:
    """Why the CSRF layer could not read this form body (it decodes it as UTF-8 and compares the
    token with ``secrets.compare_digest``, which takes ASCII only), or None."""
    try:
        fields = urllib.parse.parse_qsl(body.decode("utf-8"))
    except UnicodeDecodeError:
        return "the form body is not UTF-8"
    except ValueError as error:
        return f"the form body cannot be read: {error}"
    if any(name == "csrftoken" and not value.isascii() for name, value in fields):
        return "the csrftoken field holds characters a token never has"
    return None


async def _guard_urlencoded(app, scope, receive, send):
    """A form body the CSRF layer reads whole: read it first, answer 400 where that layer would fail."""
    early, body = [], b""
    while True:
        message = await receive()
        early.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    problem = _urlencoded_problem(body)
    if problem:
        return await _answer(scope, send, problem)
    return await app(scope, _replaying(early, receive), send)


def _replaying(early: list, receive):
    """``receive`` for the app behind: the messages read ahead first, then the rest as it comes."""
    async def replayed_receive():
        return early.pop(0) if early else await receive()

    return replayed_receive


def limit_upload_bodies(app, paths: tuple[str, ...], limits_for):
    """ASGI middleware: upload limits for POSTs to ``paths``, and a guard for the CSRF layer everywhere.

    Datasette's CSRF middleware parses a multipart body on the event loop, unbounded, before any
    view runs; this wrapper sits outside it.  On ``paths``, a refused body is cut short (so whatever
    parses it next does bounded work) and the reason is left in the scope for the view to answer with.

    On every path (Datasette's own ``/-/logout`` too), a multipart request the CSRF layer will read
    (it carries a cookie) is read ahead as far as that layer reads it, and one it would fail on with
    a 500 (see above) is answered 400 here, saying why, before it gets there."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        covered = scope["method"] == "POST" and scope["path"].endswith(paths)
        csrf_reads = _csrf_layer_reads_body(scope, headers)
        if not (covered or csrf_reads):
            return await app(scope, receive, send)
        raw_type = headers.get(b"content-type", b"")
        if csrf_reads and raw_type.split(b";", 1)[0] == b"application/x-www-form-urlencoded":
            return await _guard_urlencoded(app, scope, receive, send)
        mime, boundary = _content_type(raw_type)
        # (the second test is the CSRF layer's own: a header too odd to parse must not slip past)
        if mime != b"multipart/form-data" and not (csrf_reads and raw_type.split(b";", 1)[0] == b"multipart/form-data"):
            return await app(scope, receive, send)
        problem = _csrf_content_type_problem(raw_type, boundary) if csrf_reads else None
        if problem:
            return await _answer(scope, send, problem)
        if not boundary:  # the view says so
            return await app(scope, receive, send)
        counter = _BodyCounter(boundary, limits_for()) if covered else None
        refused = []  # shared by reference: middlewares below copy the scope dict

        async def counted_receive():
            if refused:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if counter is not None and message["type"] == "http.request":
                why = counter.add(message.get("body", b""))
                if why:
                    refused.append(why)
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        if covered:
            scope = {**scope, REFUSED_KEY: refused}
        if not csrf_reads:
            return await app(scope, counted_receive, send)

        # Read ahead (within the limits on ``paths``) as far as the CSRF layer will, then replay.
        check, early = _CsrfBodyCheck(boundary), []
        while not check.done:
            message = await counted_receive()
            early.append(message)
            if message["type"] != "http.request":
                break
            problem = check.feed(message.get("body", b""))
            if problem:
                return await _answer(scope, send, problem)
            if not message.get("more_body"):
                break

        return await app(scope, _replaying(early, counted_receive), send)

    return wrapped
