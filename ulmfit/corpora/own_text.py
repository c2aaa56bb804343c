"""Your own general-domain text for LM pretraining: plain text, JSON Lines and Parquet.

The paper pretrains on Wikipedia (Howard & Ruder 2018, Section 3.1), but what the first stage
needs is a large general-domain corpus in the target language, and Wikipedia is only one of
them (and a small one in many languages). These readers turn any such corpus into the
``(title, text)`` documents that :func:`ulmfit.corpora.prepare_wikipedia` writes.

Every reader streams: plain text and JSON Lines a line at a time (compressed or not), Parquet a
record batch at a time, so memory is bounded by one document (one row group for Parquet),
whatever the corpus size. Invalid UTF-8 goes through :class:`Repairs`, like the Wikipedia readers.
Documents have no titles; each gets a stable id, ``<file>:<line>`` (``<file>:<row>`` for Parquet),
with the file named relative to the source folder so that the output does not depend on where
the corpus lies.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from ulmfit.corpora.archive import open_stream
from ulmfit.corpora.readers import open_parquet
from ulmfit.corpora.repairs import Repairs, decode, decoded_lines
from ulmfit.errors import InputError

#: The kinds read here (the others of ``CORPUS_KINDS`` are Wikipedia formats).
OWN_KINDS = ("text", "jsonl", "parquet")
_NAMES = {
    "text": re.compile(r"\.txt(\.(gz|bz2|xz))?$", re.IGNORECASE),
    "jsonl": re.compile(r"\.(jsonl|ndjson)(\.(gz|bz2|xz))?$", re.IGNORECASE),
    "parquet": re.compile(r"\.parquet$", re.IGNORECASE),
}
_DESCRIBED = {
    "text": ".txt (or .txt.gz/.bz2/.xz)",
    "jsonl": ".jsonl (or .jsonl.gz/.bz2/.xz)",
    "parquet": ".parquet",
}
_PARQUET_BATCH_ROWS = 256  # documents per record batch (Arrow holds the row group being read)
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def natural_key(name: str) -> list:
    """Sort key putting ``part2`` before ``part10`` (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def kind_of_name(name: str) -> str | None:
    """``text``, ``jsonl`` or ``parquet`` by a file name's suffix, else ``None``."""
    return next((kind for kind, pattern in _NAMES.items() if pattern.search(name)), None)


def _visible_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, recursively, but none in or under a hidden (``.``) name."""
    for path in folder.rglob("*"):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts):
            yield path


def kinds_in_folder(folder: Path) -> set[str]:
    """The own-text kinds whose file names occur under ``folder``."""
    return {kind_of_name(path.name) for path in _visible_files(folder)} - {None}


def data_files(local: Path, kind: str) -> list[tuple[Path, str]]:
    """``(file, name)`` for a file, or for the ``kind`` files under a folder (recursive, natural
    order, hidden files and folders skipped); ``name`` is the path relative to the folder."""
    if local.is_file():
        return [(local, local.name)]
    files = sorted(
        (
            (path, path.relative_to(local).as_posix())
            for path in _visible_files(local)
            if _NAMES[kind].search(path.name)
        ),
        key=lambda item: natural_key(item[1]),
    )
    if not files:
        raise InputError(
            local,
            f"no {_DESCRIBED[kind]} files in this folder or its subfolders",
            fix=f"point path at a {kind} file or a folder holding them, or set kind to what the folder holds",
        )
    return files


def iter_documents(
    local: Path,
    kind: str,
    *,
    documents: str,
    text_column: str,
    repairs: Repairs,
    counts: Counter,
) -> Iterator[tuple[str, str]]:
    """``(id, text)`` for every document of a file or folder of ``kind``, in order. Empty
    documents (blank JSON/Parquet values, null) are skipped and counted as ``skipped_empty``."""
    for file, name in data_files(local, kind):
        if kind == "text":
            yield from iter_text(file, name, documents, repairs)
        elif kind == "jsonl":
            yield from iter_jsonl(file, name, text_column, repairs, counts)
        else:
            yield from iter_parquet(file, name, text_column, repairs, counts)


@contextlib.contextmanager
def open_text(file: Path) -> Iterator[BinaryIO]:
    """:func:`open_stream`, but UTF-16 text (plain or compressed) is named as such."""
    with open(file, "rb") as raw:
        _refuse_utf16(raw.read(64), file)  # before open_stream, which would call it binary
    with open_stream(file) as stream:
        _refuse_utf16(stream.peek(64)[:64], file)  # inside a compressed stream
        yield stream


def _lines(file: Path) -> Iterator[bytes]:
    with open_text(file) as stream:
        yield from stream


def _refuse_utf16(head: bytes, file: Path) -> None:
    # UTF-16 is the one common text encoding that is not a superset of ASCII: decoding it as
    # UTF-8 "works" and yields a NUL between letters, so it is named instead of repaired.
    even, odd = head[0::2], head[1::2]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        len(head) >= 8 and (not even.strip(b"\x00") or not odd.strip(b"\x00"))
    ):
        raise InputError(
            file,
            "the text is UTF-16, not UTF-8",
            line=1,
            fix=f"convert it: iconv -f UTF-16 -t UTF-8 '{file.name}' > converted.txt",
        )


def iter_text(file: Path, name: str, documents: str, repairs: Repairs) -> Iterator[tuple[str, str]]:
    """Plain text: one document per non-blank line (``documents="lines"``), or per block of
    lines between blank lines (``"paragraphs"``, the lines of a block joined by newlines)."""
    rows = 0
    block: list[str] = []
    start = 0
    for number, line in decoded_lines(_lines(file), file, repairs):
        rows += 1
        if number == 1:
            line = line.removeprefix("\ufeff")  # the byte-order mark Windows editors write
        line = line.rstrip()
        if documents == "lines":
            if line.strip():
                yield f"{name}:{number}", line.lstrip()
        elif line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield f"{name}:{start}", "\n".join(block).strip()
            block = []
    if block:
        yield f"{name}:{start}", "\n".join(block).strip()
    repairs.check(file, rows)


def iter_jsonl(
    file: Path, name: str, column: str, repairs: Repairs, counts: Counter
) -> Iterator[tuple[str, str]]:
    """JSON Lines: one object per line, the document under the key ``column``. Blank lines are
    allowed; a line that is not a JSON object, or lacks the key, is fatal (file:line)."""
    rows = 0
    for number, line in decoded_lines(_lines(file), file, repairs):
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        rows += 1
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise InputError(
                file,
                f"not valid JSON ({err.msg}, column {err.colno})",
                line=number,
                fix="write one JSON object per line (JSON Lines); convert a JSON array with jq -c '.[]' in.json > out.jsonl",
            ) from err
        if not isinstance(record, dict):
            raise InputError(
                file,
                f"the line is a JSON {_json_type(record)}, not an object",
                line=number,
                fix=f'write one object per line, such as {{"{column}": "..."}}',
            )
        if column not in record:
            keys = ", ".join(record) or "none"
            raise InputError(
                file,
                f"no key '{column}' (this line has: {keys})",
                line=number,
                fix="set text_column to the key that holds the text",
            )
        text = record[column]
        if text is not None and not isinstance(text, str):
            raise InputError(
                file,
                f"'{column}' is a JSON {_json_type(text)}, not a string",
                line=number,
                fix="set text_column to the key that holds the text",
            )
        text = (text or "").strip()
        if not text:
            counts["skipped_empty"] += 1
            continue
        if "\\u" in line and _SURROGATE.search(text):
            # A lone \ud800-style escape decodes to a surrogate, which is not valid Unicode and
            # which Parquet would refuse at write time: repaired like an invalid byte.
            repairs.record("invalid_bytes", file, number, "a lone UTF-16 surrogate escape")
            text = _SURROGATE.sub("\ufffd", text)
        yield f"{name}:{number}", text
    repairs.check(file, rows)


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), "number")


def iter_parquet(
    file: Path, name: str, column: str, repairs: Repairs, counts: Counter
) -> Iterator[tuple[str, str]]:
    """Parquet: the string (or binary, decoded as UTF-8) column ``column``, read
    ``_PARQUET_BATCH_ROWS`` rows at a time; ids are ``<file>:<row>`` with rows counted from 1."""
    handle = open_parquet(file, fix="check the file, or set kind to what it is (text or jsonl)")
    schema = handle.schema_arrow
    if column not in schema.names:
        raise InputError(
            file,
            f"no column '{column}' (the columns are: {', '.join(schema.names)})",
            fix="set text_column to the column that holds the text",
        )
    dtype = schema.field(column).type
    binary = pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
    if not (binary or pa.types.is_string(dtype) or pa.types.is_large_string(dtype)):
        raise InputError(
            file,
            f"column '{column}' holds {dtype}, not text",
            fix="set text_column to the column that holds the text",
        )
    row = 0
    try:
        for batch in handle.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                if binary and value is not None:
                    value = decode(value, file, row, repairs)
                text = (value or "").strip()
                if not text:
                    counts["skipped_empty"] += 1
                    continue
                yield f"{name}:{row}", text
    except (OSError, pa.ArrowException) as err:
        raise InputError(
            file,
            f"damaged Parquet data after row {row} ({err})",
            fix="the file is truncated or corrupt: copy or export it again",
        ) from err
    if binary:
        repairs.check(file, row)
