"""Read a multipart upload safely: size cap while streaming, nothing written to disk.

Datasette 0.65 has no multipart parser of its own; python-multipart (Starlette's parser)
does the parsing, fed chunk by chunk from the ASGI ``receive`` so an oversized body is
refused as soon as it passes the cap instead of after it has all arrived.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import UploadError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024


async def read_multipart(request, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> tuple[dict, dict]:
    """-> (form fields as str, files as {field: (filename, bytes)})."""
    content_type = request.headers.get("content-type", "")
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UploadError("send the image as multipart/form-data (an HTML file upload)", 415)
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary", 400)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise UploadError(f"upload too large: {int(declared) / 1e6:.1f} MB, limit {max_bytes / 1e6:.1f} MB", 413)

    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    part = {"name": None, "filename": None, "data": bytearray(), "headers": {}, "header_field": b"", "header_value": b""}

    def on_part_begin():
        part.update(name=None, filename=None, data=bytearray(), headers={}, header_field=b"", header_value=b"")

    def on_header_field(data, start, end):
        part["header_field"] += data[start:end]

    def on_header_value(data, start, end):
        part["header_value"] += data[start:end]

    def on_header_end():
        part["headers"][part["header_field"].lower()] = part["header_value"]
        part["header_field"], part["header_value"] = b"", b""

    def on_part_data(data, start, end):
        part["data"] += data[start:end]
        if len(part["data"]) > max_bytes:
            raise UploadError(f"upload too large: over the {max_bytes / 1e6:.1f} MB limit", 413)

    def on_part_end():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = (disposition.get(b"name") or b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if filename is not None:
            files[name] = (filename.decode("utf-8", "replace"), bytes(part["data"]))
        else:
            fields[name] = part["data"].decode("utf-8", "replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    received = 0
    while True:
        message = await request.receive()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > max_bytes + 64 * 1024:
            raise UploadError(f"upload too large: over the {max_bytes / 1e6:.1f} MB limit", 413)
        try:
            if chunk:
                parser.write(chunk)
            if not message.get("more_body"):
                parser.finalize()
                break
        except MultipartParseError as error:
            raise UploadError(f"the multipart/form-data body is malformed: {error}") from None
    return fields, files
