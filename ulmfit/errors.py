"""The one exception for bad input: it names the file, the line and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class InputError(ValueError):
    """Bad or missing input, reported so that a user can fix it without reading a traceback.

    ``str(err)`` reads ``"<path>:<line>: <message>. Fix: <fix>"`` (the line part only when known),
    then one indented line per entry of ``details`` (several problems reported together, such as
    every bad value of ``params.yaml``, each naming its own fix).
    """

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        fix: str,
        details: Sequence[str] = (),
    ) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        self.fix = fix
        self.details = tuple(details)
        where = self.path if line is None else f"{self.path}:{line}"
        text = f"{where}: {message}. Fix: {fix}"
        super().__init__("".join([text, *(f"\n  {detail}" for detail in self.details)]))
