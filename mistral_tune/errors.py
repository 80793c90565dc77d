"""Errors the user can fix, reported without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config value, bad data row, missing file).

    The CLI prints str(err) on one or two lines, without a traceback, and exits with status 2.
    An optional `hint` (what to do about it) becomes the second line.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nhint: {hint}")
