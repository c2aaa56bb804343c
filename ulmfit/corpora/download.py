"""Resumable, verified downloads of the public corpora, and the default progress reporter.

ULMFiT's data (Howard & Ruder 2018, Sections 3.1 and 4.1) is hundreds of megabytes to tens of
gigabytes; a dropped connection must not mean starting again. ``download`` writes into
``<name>.part``, resumes it with an HTTP ``Range`` request (also after the process restarts),
sniffs the bytes for an HTML error page, verifies the sha256 when one is known, and only then
renames the file into place, so a file without ``.part`` is always complete.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from ulmfit.corpora.archive import check_format
from ulmfit.errors import InputError
from ulmfit.io import sha256_file

#: ``progress(stage, done, total)``: ``done`` and ``total`` count bytes for downloads and
#: documents for parsing; ``total`` is ``None`` when unknown.
Progress = Callable[[str, int, "int | None"], None]

_log = logging.getLogger("ulmfit.corpora")


class ConsoleProgress:
    """tqdm bars on a terminal; otherwise one log line per stage every ``interval`` seconds.

    It is the default ``progress`` of the ``prepare_*`` functions; pass any other callable with
    the same signature to route progress elsewhere (a Prefect logger, a test list).
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._bars: dict[str, object] = {}
        self._last: dict[str, float] = {}
        self._tty = sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self._tty:
            from tqdm.auto import tqdm

            bar = self._bars.get(stage)
            if bar is None:
                unit = "B" if stage.startswith("download") else "docs"
                bar = self._bars[stage] = tqdm(
                    desc=stage, total=total, unit=unit, unit_scale=True, leave=False
                )
            bar.total = total  # type: ignore[attr-defined]
            bar.update(done - bar.n)  # type: ignore[attr-defined]
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if finished or stage not in self._last or now - self._last[stage] >= self.interval:
            self._last[stage] = now
            of = f"/{total}" if total is not None else ""
            _log.info("%s: %d%s", stage, done, of)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()  # type: ignore[attr-defined]
        self._bars.clear()


def _http_error(url: str, response: requests.Response) -> InputError:
    return InputError(
        url,
        f"HTTP {response.status_code} {response.reason}",
        fix="check the URL (or your network); pass a working mirror with url= or a local copy with path=",
    )


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    session: requests.Session | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
    retries: int = 5,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and return ``dest``.

    An existing ``dest`` is trusted only when its sha256 matches ``sha256`` (or none is known).
    A connection dropped midway is resumed from the bytes already on disk, up to ``retries``
    times. Raises ``InputError`` for HTTP errors, an HTML page instead of the data, or a
    checksum mismatch (the bad file is deleted so the next run downloads it afresh).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # a stale or damaged copy: fetch it again
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    stage = f"download {dest.name}"
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            complete = _fetch(
                url, part, offset, headers, session, chunk_size, timeout, progress, stage
            )
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as err:
            complete = False
            if attempt >= retries:
                raise InputError(
                    url,
                    f"the download kept failing after {retries} resumed attempts ({type(err).__name__})",
                    fix=f"run again to resume from {part} or download the file by hand and pass path=",
                ) from err
        if complete:
            break
        attempt += 1
        if attempt > retries:
            raise InputError(
                url,
                f"the server kept closing the connection before the end ({retries} resumed attempts)",
                fix=f"run again to resume from {part}, or pass a mirror with url=",
            )
        time.sleep(min(2.0**attempt * 0.1, 5.0))
    try:
        check_format(part, dest.name)
    except InputError as err:
        part.unlink()
        raise InputError(url, err.message, fix=err.fix) from err
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()
            raise InputError(
                url,
                f"checksum mismatch: expected sha256 {sha256}, got {actual}",
                fix="the download was deleted; run again to re-download, and if it persists the mirror serves a different file: pass the right sha256= or another url=",
            )
    os.replace(part, dest)
    return dest


def _fetch(
    url: str,
    part: Path,
    offset: int,
    headers: dict[str, str],
    session: requests.Session,
    chunk_size: int,
    timeout: float,
    progress: Progress | None,
    stage: str,
) -> bool:
    """One HTTP request appending to ``part``; True when the file is complete."""
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416 and offset:
            # Range not satisfiable: the part file already holds every byte.
            return True
        if response.status_code >= 400:
            raise _http_error(url, response)
        if response.status_code == 200 and offset:
            offset = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        with open(part, "ab" if offset else "wb") as out:
            for chunk in response.iter_content(chunk_size):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(stage, done, total)
            out.flush()
            os.fsync(out.fileno())
    return total is None or done >= total
