"""Read a multipart upload safely: capped while it streams, parsed off the event loop, nothing on disk.

Datasette 0.65 has no multipart parser of its own; python-multipart (Starlette's parser) does the
parsing.  The body is received on the event loop (cheap: only bytes are counted, and an oversized
body is refused as soon as it passes the cap), then parsed in a worker thread with limits on the
number of parts and the size of each part's headers and text fields, so a body of 150,000 tiny
parts is refused after a few dozen instead of holding the event loop while it is picked apart.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import io
import json
import secrets
import threading
import urllib.parse

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..search.errors import UploadError
from ..settings import DECLARED, settings_of
from ..store import ids

DEFAULT_MAX_UPLOAD_BYTES = DECLARED["max_upload_bytes"].default
# Room for the form's own fields and the multipart framing around the image.
FORM_OVERHEAD_BYTES = 64 * 1024
# Where limit_upload_bodies leaves the reason it cut a body short, for the view to answer with.
REFUSED_KEY = "mapclip.upload_refused"


# The cookie that tells an uploader's browser apart, so only it is shown the picture it uploaded.
UPLOADER_COOKIE = "mapclip_uploader"


def uploader_token(request) -> tuple[str, bool]:
    """(this browser's uploader token, whether it is new and must be set as a cookie)."""
    token = request.cookies.get(UPLOADER_COOKIE) or ""
    if len(token) == 32 and all(c in "0123456789abcdef" for c in token):
        return token, False
    return secrets.token_hex(16), True


class UploadPreviews:
    """Small JPEG previews of the last uploads, so the page can show visitors the picture they
    searched with (in memory only, never written; gone after a restart, when the page simply says an
    uploaded picture is used).  Each is kept for the browser that uploaded it (``owner``: its
    uploader cookie) and the query vector: anyone else opening the same search URL gets no picture,
    since the vector in a shared URL must not show them someone else's upload."""

    def __init__(self, size: int = 160, keep: int = 256):
        self.size, self.keep = size, keep
        self.previews: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(vector: bytes, owner: str) -> str:
        return hashlib.sha256(owner.encode() + b"\0" + vector).hexdigest()

    def remember(self, vector: bytes, image, owner: str) -> None:
        """Called with the decoded upload (already reduced to about the model's size), off the event loop."""
        small = image.convert("RGB")
        small.thumbnail((self.size, self.size))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80)
        url = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
        key = self.key(vector, owner)
        with self.lock:
            self.previews[key] = url
            self.previews.move_to_end(key)
            while len(self.previews) > self.keep:
                self.previews.popitem(last=False)

    def data_url(self, vector: bytes | None, owner: str | None) -> str | None:
        if not vector or not owner:
            return None
        with self.lock:
            return self.previews.get(self.key(vector, owner))

    def for_owner(self, owner: str) -> "OwnedPreviews":
        return OwnedPreviews(self, owner)


@dataclasses.dataclass(frozen=True)
class OwnedPreviews:
    """``remember(vector, image)`` for one uploader (what search/service.embed_upload calls)."""

    previews: UploadPreviews
    owner: str

    def remember(self, vector: bytes, image) -> None:
        self.previews.remember(vector, image, self.owner)


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


class _PartHeaders:
    """One multipart part's headers as python-multipart's parser reports them, their bytes capped at
    ``max_header_bytes``; ``name`` and ``filename`` from its Content-Disposition once they are all in.
    The callbacks both readers of a form share (``parse_multipart`` and the CSRF read-ahead)."""

    def __init__(self, limits: "UploadLimits"):
        self.limits = limits
        self.begin()

    def begin(self):
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.size = 0
        self.name, self.filename = b"", None

    def _count(self, n: int):
        self.size += n
        if self.size > self.limits.max_header_bytes:
            raise UploadError(f"a form part's headers are too long: over {self.limits.max_header_bytes} bytes")

    def on_header_field(self, data, start, end):
        self._count(end - start)
        self.field += data[start:end]

    def on_header_value(self, data, start, end):
        self._count(end - start)
        self.value += data[start:end]

    def on_header_end(self):
        self.headers[self.field.lower()] = self.value
        self.field = self.value = b""

    def finish(self):
        """After the last header: the part's field name and file name (None: not a file), as bytes."""
        _, disposition = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name, self.filename = disposition.get(b"name") or b"", disposition.get(b"filename")

    def parser(self, boundary: bytes, *, on_part_begin, on_headers_finished, on_part_data, on_part_end):
        """A parser of a body with this boundary: the header callbacks here, the rest the caller's."""
        def begin():
            self.begin()
            on_part_begin()

        def headers_finished():
            self.finish()
            on_headers_finished()

        return MultipartParser(boundary, {
            "on_part_begin": begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
        })


def parse_multipart(body: bytes, boundary: bytes, limits: UploadLimits = UploadLimits()) -> tuple[dict, dict]:
    """Parse a whole multipart body (in a worker thread) within ``limits``."""
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    part = _PartHeaders(limits)
    data = bytearray()
    count = 0

    def on_part_begin():
        nonlocal count
        count += 1
        if count > limits.max_parts:
            raise _too_many_parts(limits)
        data.clear()

    def on_part_data(chunk, start, end):
        data.extend(chunk[start:end])
        if part.filename is None and len(data) > limits.max_field_bytes:
            name = part.name.decode("utf-8", "replace")
            raise UploadError(f"form field {name[:40]!r} is too long: over {limits.max_field_bytes} bytes")
        if len(data) > limits.max_bytes:
            raise _too_large(limits)

    def on_part_end():
        name = part.name.decode("utf-8", "replace")
        if part.filename is not None:
            files[name] = (part.filename.decode("utf-8", "replace"), bytes(data))
        else:  # a field sent more than once (a form's repeated term rows) keeps every value, in order
            value = data.decode("utf-8", "replace")
            earlier = fields.get(name)
            fields[name] = value if earlier is None else (
                [*earlier, value] if isinstance(earlier, list) else [earlier, value])

    parser = part.parser(boundary, on_part_begin=on_part_begin, on_headers_finished=lambda: None,
                         on_part_data=on_part_data, on_part_end=on_part_end)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as error:
        raise _parse_error(error, limits) from None
    return fields, files


def _parse_error(error: Exception, limits: UploadLimits) -> UploadError:
    """python-multipart's own error, said as the plugin's limits say it (0.0.26 and later count
    header lines themselves, and may refuse one before our per-part count does)."""
    text = str(error)[:200] or type(error).__name__
    if text.startswith(("Maximum header size", "Maximum header count")):
        return UploadError(f"a form part's headers are too long: over {limits.max_header_bytes} bytes or too many")
    return UploadError(f"the multipart/form-data body is malformed: {text}")


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


# --- Datasette 0.65's CSRF check of a multipart form, done here -----------------------------------
# For any method but GET, HEAD, OPTIONS and TRACE, on any path, when the request carries a cookie,
# no "Authorization: Bearer" and no matching "x-csrftoken" header, Datasette 0.65's CSRF layer
# (asgi-csrf) reads a multipart body with python-multipart's FormParser until the ``csrftoken``
# field, and compares it with the signed ``ds_csrftoken`` cookie.  It fails with a 500 on a boundary
# written any way but ``; boundary=X``, a malformed body or a token that is not UTF-8, and it passes
# FormParser an argument python-multipart 0.0.25 removed, so with any release that has the recent
# security fixes every such form would be a 500.  So this wrapper makes the same check itself, with
# the same rules (the token before any file part, equal to a validly signed cookie), reading the
# body with the stable low-level MultipartParser, and tells the CSRF layer (``skip_csrf``) that the
# request is checked: that layer never parses a multipart body.  The 1.0 alphas check CSRF by
# Sec-Fetch-Site/Origin headers and parse no body.
_CSRF_UNCHECKED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CSRF_CHECKED_KEY = "mapclip.csrf_checked"  # set in the scope of a form whose token this wrapper checked
CSRF_COOKIE, CSRF_FIELD, CSRF_HEADER, CSRF_NAMESPACE = "ds_csrftoken", b"csrftoken", b"x-csrftoken", "csrftoken"
# A form's csrftoken field must come within this much of its body (a page's forms put it first).
MAX_BYTES_BEFORE_TOKEN = 1024 * 1024
MAX_TOKEN_BYTES = 1024


class FormCsrf:
    """What the wrapper needs from Datasette 0.65 for the check: its cookie's signature, and whether
    another plugin's ``skip_csrf`` already exempts the request (then nothing is checked, as there)."""

    def __init__(self, datasette):
        self.datasette = datasette

    def cookie_token(self, headers: dict) -> str | None:
        """The ``ds_csrftoken`` cookie if it is validly signed by this server, else None."""
        from http.cookies import CookieError, SimpleCookie

        cookies = SimpleCookie()
        try:
            cookies.load(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            return None
        morsel = cookies.get(CSRF_COOKIE)
        if morsel is None or not morsel.value:
            return None
        try:
            self.datasette.unsign(morsel.value, CSRF_NAMESPACE)
        except Exception:  # itsdangerous' BadSignature and anything a forged value raises
            return None
        return morsel.value

    def exempted_elsewhere(self, scope) -> bool:
        from datasette.plugins import pm

        return any(pm.hook.skip_csrf(datasette=self.datasette, scope=scope))


def _cookie_readable(raw: bytes | None) -> bool:
    """Whether Datasette 0.65's CSRF layer can read this Cookie header (it decodes it as UTF-8 and
    hands it to ``SimpleCookie.load``, catching nothing)."""
    if not raw:
        return True
    from http.cookies import CookieError, SimpleCookie

    try:
        SimpleCookie().load(raw.decode("utf-8"))
    except (UnicodeDecodeError, CookieError):
        return False
    return True


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


class _FormToken:
    """Reads a multipart body as it arrives, as far as its ``csrftoken`` field: ``done`` once the token
    is read (``token``), a file part comes first (``file_first``) or the body ended without one.
    UploadError: the body is malformed, or the token does not come soon enough."""

    def __init__(self, boundary: bytes, limits: UploadLimits):
        self.done, self.token, self.file_first = False, None, False
        self.limits = limits
        self.read = self.chunk_start = 0  # bytes fed; where the chunk being parsed starts
        self.part = _PartHeaders(limits)
        self.data = b""
        self.parser = self.part.parser(boundary, on_part_begin=self._begin, on_headers_finished=self._headers_finished,
                                       on_part_data=self._data, on_part_end=self._end)

    def _begin(self):
        self.data = b""

    def _headers_finished(self):
        if self.part.filename is not None:  # a file part before the token: refused, as asgi-csrf does
            self.file_first, self.done = True, True
            raise _Stop

    def _data(self, data, start, end):
        if self.part.name == CSRF_FIELD:
            if self.chunk_start + end > MAX_BYTES_BEFORE_TOKEN:
                raise _too_late()
            self.data += data[start:end]
            if len(self.data) > MAX_TOKEN_BYTES:
                self.done = True  # no token is this long: a mismatch
                raise _Stop

    def _end(self):
        if self.part.name == CSRF_FIELD:
            try:
                self.token = self.data.decode("ascii")
            except UnicodeDecodeError:
                self.token = None  # a token is ASCII: this one cannot match
            self.done = True
            raise _Stop

    def feed(self, chunk: bytes, last: bool) -> None:
        if self.done:
            return
        self.chunk_start = self.read
        self.read += len(chunk)
        try:
            self.parser.write(chunk)
            if last and not self.done:
                self.parser.finalize()
        except _Stop:
            return
        except UploadError:
            raise
        except Exception as error:  # python-multipart's parse errors, whatever their class in this release
            raise _parse_error(error, self.limits) from None
        if last:
            self.done = True
        elif self.read > MAX_BYTES_BEFORE_TOKEN:
            raise _too_late()


def _too_late() -> UploadError:
    return UploadError(f"the form's csrftoken field must come within its first {MAX_BYTES_BEFORE_TOKEN // 1024} KiB"
                       " (put it first)", 413)


class _Stop(Exception):
    pass


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


# The CSRF layer holds a whole form body in memory to find its token: a bigger one is refused first.
# (Datasette's own forms send a few hundred bytes; a plugin's form of text fields stays far below.)
MAX_FORM_BODY_BYTES = 8 * 1024 * 1024


async def _guard_urlencoded(app, scope, receive, send):
    """A form body the CSRF layer reads whole: read it first (at most ``MAX_FORM_BODY_BYTES``),
    answer 4xx where that layer would fail or hold too much."""
    too_large = f"the form body is too large: over {MAX_FORM_BODY_BYTES // (1024 * 1024)} MiB"
    declared = ids.declared_length(dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1"))
    if declared is not None and declared > MAX_FORM_BODY_BYTES:
        return await _answer(scope, send, too_large, 413)
    early, body = [], bytearray()
    while True:
        message = await receive()
        early.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if len(body) > MAX_FORM_BODY_BYTES:
            return await _answer(scope, send, too_large, 413)
        if not message.get("more_body"):
            break
    problem = _urlencoded_problem(bytes(body))
    if problem:
        return await _answer(scope, send, problem)
    return await app(scope, _replaying(early, receive), send)


def _replaying(early: list, receive):
    """``receive`` for the app behind: the messages read ahead first, then the rest as it comes."""
    async def replayed_receive():
        return early.pop(0) if early else await receive()

    return replayed_receive


def limit_upload_bodies(app, paths: tuple[str, ...], limits_for, csrf: FormCsrf | None = None):
    """ASGI middleware: upload limits for POSTs to ``paths``, and (``csrf``: Datasette 0.65) the CSRF
    check of every multipart form, on every path, in place of Datasette's CSRF layer (see above).

    On ``paths``, a refused body is cut short (so whatever parses it next does bounded work) and the
    reason is left in the scope for the view to answer with.  A form body the CSRF layer reads whole
    (urlencoded) and could not read is answered 400 here."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if csrf is not None and not _cookie_readable(headers.get(b"cookie")):
            # asgi-csrf reads the Cookie header of every request as UTF-8: any other bytes were a 500
            return await _answer(scope, send, "the Cookie header cannot be read (it is not UTF-8 text)")
        covered = scope["method"] == "POST" and scope["path"].endswith(paths)
        csrf_reads = csrf is not None and _csrf_layer_reads_body(scope, headers)
        if not (covered or csrf_reads):
            return await app(scope, receive, send)
        raw_type = headers.get(b"content-type", b"")
        if csrf_reads and raw_type.split(b";", 1)[0] == b"application/x-www-form-urlencoded":
            return await _guard_urlencoded(app, scope, receive, send)
        mime, boundary = _content_type(raw_type)
        # (the second test is the CSRF layer's own: a header too odd to parse must not slip past)
        multipart = mime == b"multipart/form-data" or raw_type.split(b";", 1)[0] == b"multipart/form-data"
        if not multipart:
            return await app(scope, receive, send)
        if csrf_reads and csrf.exempted_elsewhere(scope):
            csrf_reads = False  # another plugin's skip_csrf: the CSRF layer reads nothing either
        if not boundary:
            if csrf_reads:
                return await _answer(scope, send, "multipart/form-data without a boundary")
            return await app(scope, receive, send)  # the view says so
        limits = limits_for()
        counter = _BodyCounter(boundary, limits) if covered else None
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

        cookie_token = csrf.cookie_token(headers)
        header_token = headers.get(CSRF_HEADER, b"").decode("latin-1")
        if cookie_token and header_token and secrets.compare_digest(header_token.encode(), cookie_token.encode()):
            return await app({**scope, CSRF_CHECKED_KEY: True}, counted_receive, send)

        # Read ahead (within the limits on ``paths``) as far as the token, check it, then replay.
        reader, early = _FormToken(boundary, limits), []
        try:
            while not reader.done:
                message = await counted_receive()
                early.append(message)
                if message["type"] != "http.request":
                    break
                reader.feed(message.get("body", b""), last=not message.get("more_body"))
        except UploadError as error:
            return await _answer(scope, send, str(error), error.status)
        if refused:  # over the upload limits before the token
            return await _answer(scope, send, str(refused[0]), refused[0].status)
        if reader.file_first:
            return await _answer(scope, send, "CSRF check failed: a file comes before the form's csrftoken field "
                                              "(put csrftoken first)", 403)
        if not (cookie_token and reader.token
                and secrets.compare_digest(reader.token.encode(), cookie_token.encode())):
            return await _answer(scope, send, "CSRF check failed: the form's csrftoken field does not match its "
                                              f"{CSRF_COOKIE} cookie (reload the page and send the form again)", 403)
        return await app({**scope, CSRF_CHECKED_KEY: True}, _replaying(early, counted_receive), send)

    return wrapped
