"""Errors meant for people: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class SpattnError(Exception):
    """Any error caused by the user's input (a pattern, a tensor, a command-line flag)."""


class PatternError(SpattnError, ValueError):
    """A pattern that does not validate, with the field and the YAML line it comes from."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None,
                 line: int | None = None) -> None:
        self.message, self.source, self.field, self.line = message, source, field, line
        where = ":".join(str(x) for x in (source, line) if x is not None)
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}" if where else what)
