"""Errors a search request can meet, each carrying the HTTP status it is answered with.

Routes answer ``error.status`` with ``str(error)``; nothing chooses a status by reading a message.
"""

from __future__ import annotations


class SearchError(Exception):
    """A request that cannot be answered; the message is for the person who sent it."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadSearch(SearchError, ValueError):
    """Bad parameters (HTTP 400)."""


class NotFound(SearchError):
    """A collection, model or map that does not exist here (HTTP 404)."""

    status = 404


class SearchUnavailable(SearchError):
    """The server cannot answer now: the model cannot be loaded, or the search ran past
    the server's time limit (HTTP 503)."""

    status = 503


class UploadError(SearchError):
    """An upload refused before or while it was read (400, 413 too large, 415 wrong type)."""
