"""The one exception for bad input: it names the file, the line and the fix; and the one line
for a full disk."""

from __future__ import annotations

import errno
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


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def full_disk(error: BaseException) -> str | None:
    """The one-line message for a write that failed because its file system (or quota) is
    full, or ``None`` for any other error. pyarrow raises such an ``OSError`` with the errno in
    its text only."""
    if not isinstance(error, OSError):
        return None
    if error.errno not in FULL_DISK_ERRNOS and "No space left on device" not in str(error):
        return None
    where = error.filename or "a write"
    folder = Path(error.filename).parent if error.filename else Path.cwd()
    return (
        f"{where}: no space left on device. Fix: free space on that file system "
        f"(df -h {folder}), then run again: a training stage resumes from its last checkpoint"
    )
