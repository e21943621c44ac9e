"""Which stored values may become links: only http(s) URLs with a host."""

from __future__ import annotations

import urllib.parse


def web_url(value) -> str | None:
    """A catalogue field as a link only when it is an http(s) URL with a host; anything else
    (``javascript:``, ``data:``, a local path) is never handed to a page as href or src."""
    if not isinstance(value, str):
        return None
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return value.strip()
