"""Recognising, opening and safely extracting downloaded corpus files.

The corpora of ULMFiT (Howard & Ruder 2018, Sections 3.1 and 4.1) arrive as tar/zip archives and
bz2/gz streams. Everything here treats them as untrusted input:

- ``sniff_format`` reads magic bytes, so an HTML error page saved as ``.tgz`` is named as such
  instead of surfacing later as a baffling ``tarfile`` error;
- ``safe_extract`` refuses absolute paths, ``..`` traversal, links leaving the target, device
  files and decompression bombs, and extracts into a temporary folder renamed into place only on
  success, so a truncated archive never leaves a half-extracted tree behind.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ulmfit.errors import InputError
from ulmfit.io import default_permissions

_MAGIC = {
    "gzip": b"\x1f\x8b",
    "bz2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "zip": b"PK\x03\x04",
}
_EMPTY_ZIP = b"PK\x05\x06"

#: What a file name promises, so that a mismatch can be reported against the name.
_SUFFIX_FORMATS = (
    (".tar.gz", "gzip"),
    (".tgz", "gzip"),
    (".tar.bz2", "bz2"),
    (".tar.xz", "xz"),
    (".gz", "gzip"),
    (".bz2", "bz2"),
    (".xz", "xz"),
    (".zip", "zip"),
    (".tar", "tar"),
)

_CORRUPT = (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError, zipfile.BadZipFile)


@dataclass(frozen=True)
class ExtractLimits:
    """Decompression-bomb guard: the total bytes written and the ratio to the archive size.

    The defaults fit every corpus of the paper (WikiText-103 unpacks to ~0.55 GB from 0.19 GB,
    ratio ~3; IMDb ~0.5 GB from 0.08 GB) with a wide margin, while a crafted archive that
    expands 1 KB into gigabytes stops at once.
    """

    max_total_bytes: int = 20 * 1024**3
    max_ratio: float = 200.0
    #: The ratio is only checked past this many bytes: tiny archives of tiny files compress
    #: "badly" or "too well" without being dangerous.
    ratio_grace_bytes: int = 16 * 1024**2


def sniff_format(path: str | Path) -> str:
    """``gzip``, ``bz2``, ``xz``, ``zip``, ``tar``, ``html``, ``empty`` or ``text``/``binary``."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "empty"
    for name, magic in _MAGIC.items():
        if head.startswith(magic):
            return name
    if head.startswith(_EMPTY_ZIP):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    lowered = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<head")) or (
        lowered.startswith(b"<?xml") and b"<html" in lowered
    ):
        return "html"
    if b"\x00" in head:
        return "binary"
    return "text"


def expected_format(name: str) -> str | None:
    """The format a file name promises (``None`` for plain names such as ``train.csv``)."""
    lowered = name.lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if lowered.endswith(suffix):
            return fmt
    return None


def check_format(path: str | Path, name: str | None = None) -> str:
    """Sniff ``path`` and fail clearly when it is empty, an HTML page, or not what its name says."""
    path = Path(path)
    name = name or path.name
    fmt = sniff_format(path)
    if fmt == "empty":
        raise InputError(
            path,
            "the file is empty",
            fix="delete it and download it again, or point the source at a complete copy",
        )
    if fmt == "html":
        raise InputError(
            path,
            f"this is an HTML page, not the {expected_format(name) or 'data'} file its name promises "
            "(a server error or login page saved under the data's name)",
            fix="delete it, check the URL in a browser, and pass a working mirror with url= or a local copy with path=",
        )
    want = expected_format(name)
    if want is not None and want != fmt and not (want == "tar" and fmt == "text"):
        raise InputError(
            path,
            f"the name promises {want} data but the content is {fmt}",
            fix="delete it and download it again; if it came from a mirror, check that the mirror serves the raw file",
        )
    return fmt


def is_archive(path: str | Path) -> bool:
    """True for tar (any compression) and zip files, by content, not by name."""
    fmt = sniff_format(path)
    if fmt in ("zip", "tar"):
        return True
    if fmt in ("gzip", "bz2", "xz"):
        opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[fmt]
        try:
            with opener(path, "rb") as f:
                head = f.read(512)
        except _CORRUPT:
            # Too damaged to peek inside: trust the name, so extraction reports the truncation.
            return str(path).lower().endswith((".tgz", ".tar.gz", ".tar.bz2", ".tar.xz"))
        return len(head) >= 262 and head[257:262] == b"ustar"
    return False


@contextlib.contextmanager
def open_stream(path: str | Path) -> Iterator[BinaryIO]:
    """Open a single-file stream (plain, gzip, bz2 or xz) for binary reading, by content."""
    path = Path(path)
    fmt = check_format(path)
    if fmt in ("gzip", "bz2", "xz"):
        opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[fmt]
        handle = opener(path, "rb")
    elif fmt in ("text", "tar"):
        handle = open(path, "rb")  # noqa: SIM115 (closed in the finally below)
    else:
        raise InputError(
            path,
            f"expected a text file or a compressed text stream, found {fmt}",
            fix="point the source at the text (or .gz/.bz2) file",
        )
    try:
        # Buffered: line iteration over a raw stream would read one byte at a time.
        yield io.BufferedReader(_TruncationReporter(handle, path), buffer_size=1 << 20)
    finally:
        handle.close()


class _TruncationReporter(io.RawIOBase):
    """Turns the decompressors' EOFError/zlib errors into an InputError naming the file."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self._handle = handle
        self._path = path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        try:
            data = self._handle.read(len(buffer))
        except _CORRUPT as err:
            raise truncated_error(self._path, err) from err
        buffer[: len(data)] = data
        return len(data)


def truncated_error(path: str | Path, err: BaseException) -> InputError:
    return InputError(
        path,
        f"the archive is truncated or corrupt ({type(err).__name__}: {err})",
        fix="delete it so it is downloaded again (an interrupted copy), or check the mirror serves the complete file",
    )


def _check_member_name(archive: Path, name: str) -> str:
    """Return a safe relative POSIX path, or raise for absolute paths and traversal."""
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or (len(cleaned) > 1 and cleaned[1] == ":"):
        raise InputError(
            archive,
            f"member '{name}' has an absolute path",
            fix="do not use this archive: it tries to write outside the extraction folder",
        )
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InputError(
            archive,
            f"member '{name}' climbs out with '..'",
            fix="do not use this archive: it tries to write outside the extraction folder",
        )
    return "/".join(parts)


class _Budget:
    """Counts bytes written during extraction and stops a decompression bomb."""

    def __init__(self, archive: Path, limits: ExtractLimits) -> None:
        self.archive = archive
        self.limits = limits
        self.compressed = max(1, archive.stat().st_size)
        self.written = 0

    def add(self, n: int) -> None:
        self.written += n
        if self.written > self.limits.max_total_bytes:
            raise InputError(
                self.archive,
                f"extraction exceeds the limit of {self.limits.max_total_bytes} bytes (decompression bomb guard)",
                fix="raise max_extract_bytes if this archive is genuinely that large",
            )
        ratio = self.written / self.compressed
        if self.written > self.limits.ratio_grace_bytes and ratio > self.limits.max_ratio:
            raise InputError(
                self.archive,
                f"extraction expands the archive more than {self.limits.max_ratio:g}x (decompression bomb guard)",
                fix="raise max_extract_ratio if this archive genuinely compresses that well",
            )


def _copy(source: BinaryIO, dest: Path, budget: _Budget) -> None:
    with open(dest, "wb") as out:
        while chunk := source.read(1 << 20):
            budget.add(len(chunk))
            out.write(chunk)


def _inside(root: Path, relative: str) -> bool:
    resolved = (root / relative).resolve()
    return resolved == root.resolve() or root.resolve() in resolved.parents


def _check_end_of_archive(archive: Path, tar: tarfile.TarFile, members: int) -> None:
    """A tar ends with zero blocks. ``tarfile`` treats a file that simply stops at a 512-byte
    header boundary as complete, so a copy cut there would extract only its first members."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise InputError(
            archive,
            f"the archive is truncated: it stops after {members} members, without tar's "
            "end-of-archive marker",
            fix="delete it so it is downloaded again (an interrupted copy), or check the mirror serves the complete file",
        )


def _extract_tar(archive: Path, target: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = _check_member_name(archive, member.name)
            if not name:
                continue
            dest = target / name
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # regular members always have content
                _copy(source, dest, budget)
            elif member.issym() or member.islnk():
                link = member.linkname.replace("\\", "/")
                # A symlink target is relative to the link's folder; a hard link's to the root.
                relative = (
                    posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                    if member.issym()
                    else posixpath.normpath(link)
                )
                if (
                    link.startswith("/")
                    or relative.startswith("..")
                    or not _inside(target, relative)
                ):
                    kind = "symlink" if member.issym() else "hard link"
                    raise InputError(
                        archive,
                        f"member '{member.name}' is a {kind} to '{member.linkname}', outside the extraction folder",
                        fix="do not use this archive: links leaving the target are refused",
                    )
                dest.parent.mkdir(parents=True, exist_ok=True)
                linked = target / relative
                if not linked.is_file():
                    raise InputError(
                        archive,
                        f"link '{member.name}' points at '{member.linkname}', which is not an extracted file",
                        fix="do not use this archive",
                    )
                # Materialise the link as a copy: the tree then holds only plain files.
                with open(linked, "rb") as source:
                    _copy(source, dest, budget)
            else:
                raise InputError(
                    archive,
                    f"member '{member.name}' is a device, FIFO or other special file",
                    fix="do not use this archive: only files and folders are extracted",
                )
        _check_end_of_archive(archive, tar, len(tar.members))


def _extract_zip(archive: Path, target: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = _check_member_name(archive, info.filename)
            if not name:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InputError(
                    archive,
                    f"member '{info.filename}' is a symlink",
                    fix="do not use this archive: links are refused",
                )
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InputError(
                    archive,
                    f"member '{info.filename}' is a special file",
                    fix="do not use this archive",
                )
            dest = target / name
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source:
                _copy(source, dest, budget)


def safe_extract(
    archive: str | Path, target: str | Path, limits: ExtractLimits | None = None
) -> Path:
    """Extract a tar (any compression) or zip archive into ``target`` and return it.

    Extraction goes into a temporary sibling folder renamed to ``target`` at the end, so a
    failure (truncation, a refused member, the bomb guard) leaves nothing behind. An existing
    ``target`` is assumed complete (it only ever appears through that rename) and reused.
    """
    archive, target = Path(archive), Path(target)
    if target.is_dir():
        return target
    fmt = check_format(archive)
    limits = limits or ExtractLimits()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    default_permissions(staging, directory=True)
    try:
        budget = _Budget(archive, limits)
        try:
            if fmt == "zip":
                _extract_zip(archive, staging, budget)
            else:
                _extract_tar(archive, staging, budget)
        except InputError:
            raise
        except _CORRUPT as err:
            raise truncated_error(archive, err) from err
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
