"""The one-line errors every command prints: ``error: <what is wrong>: <the fix>``."""

from __future__ import annotations

import sys


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def fail(e: BaseException | str, code: int = 2) -> int:
    """Print ``error: ...`` (one line) on stderr; returns the exit code to return from main."""
    print(f"error: {first_line(e) if isinstance(e, BaseException) else e}", file=sys.stderr)
    return code
