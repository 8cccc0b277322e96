"""Text for a person's terminal."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` for a terminal: control characters (an ESC sequence in a document's error message could
    rewrite the screen or the title) shown as escapes, never sent."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
