"""The error contract: bad input is a `UserError` (one line on stderr, exit code 2, no traceback).

Anything else is a bug and surfaces as exit 1 with its traceback. A `UserError` message says what was
wrong, where (file, line, field or value) and what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: a multi-line message would look like a traceback in a terminal.
        super().__init__(" ".join(str(message).split()))


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format a location as `path:line (field)` for error messages."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field:
        loc += f" ({field})"
    return loc
