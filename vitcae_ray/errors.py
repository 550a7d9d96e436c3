"""The one-line errors every command prints: ``error: <what is wrong>: <the fix>``."""

from __future__ import annotations

import sys


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none; a
    first line that only announces what follows (ends with ':', as torch's state-dict errors
    do) gets the next line too."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def fail(e: BaseException | str, code: int = 2) -> int:
    """Print ``error: ...`` (one line) on stderr; returns the exit code to return from main."""
    print(f"error: {first_line(e) if isinstance(e, BaseException) else e}", file=sys.stderr)
    return code
