"""The one exception for bad input: it names the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad or missing input, reported so that a user can fix it without reading a traceback.

    ``str(err)`` reads ``"<path>:<line>: <message>. Fix: <fix>"`` (the line part only when known).
    """

    def __init__(
        self, path: str | Path, message: str, *, line: int | None = None, fix: str
    ) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        self.fix = fix
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}. Fix: {fix}")
