"""Text from a file (a CSV cell or header, a file name) quoted in a message for the terminal."""

from __future__ import annotations

from datasette_mapclip.store.records import displayable


def shown(text, limit: int | None = 100) -> str:
    """``text`` safe to print: control characters (ESC, BEL, CR, NUL...) and other characters
    that do not print become backslash escapes (``\\x1b``), so a file cannot send a terminal
    escape sequence to the user's terminal through an error message; bytes that were not
    UTF-8 become escapes too (``displayable``).  Cut to ``limit`` characters with an ellipsis.
    Printable text, backslashes included, is left as it is: quoting twice changes nothing."""
    text = displayable(str(text))
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
