"""Readers of the classification datasets' file formats: the Zhang et al. (2015) CSVs, TREC-6's
label files, folders of one text file per document (IMDb, BBC News) and unlabelled CSVs. Each
returns texts and 0-based labels, records repairable defects in :class:`Repairs`, and raises
:class:`InputError` naming the file and line for anything else.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from ulmfit.corpora.archive import open_stream
from ulmfit.corpora.repairs import Repairs, decode, decoded_lines
from ulmfit.errors import InputError

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class RawData:
    """What a reader found: labelled train/test, unlabelled texts, and the class names."""

    label_names: tuple[str, ...]
    train_texts: list[str] = field(default_factory=list)
    train_labels: list[int] = field(default_factory=list)
    test_texts: list[str] | None = None
    test_labels: list[int] | None = None
    unsup_texts: list[str] = field(default_factory=list)


def lines_of(path: Path) -> Iterator[bytes]:
    with open_stream(path) as stream:
        yield from stream


def join_text_fields(fields: list[str], title_join: str) -> str:
    """Several text columns (title and body) as one text; one column stripped.

    ``"fastai"``: as fastai's ``_join_texts`` with ``mark_fields=True``, its default for more
    than one text column: ``xxfld 1 <title> xxfld 2 <body>``. ``"newline"``: the non-empty
    fields separated by a blank line.
    """
    fields = [f.strip() for f in fields]
    if len(fields) == 1:
        return fields[0]
    if not any(fields):
        return ""
    if title_join == "newline":
        return "\n\n".join(f for f in fields if f)
    return " ".join(f"xxfld {i} {f}" for i, f in enumerate(fields, start=1))


def read_zhang_csv(
    path: Path,
    *,
    columns: int,
    num_classes: int,
    drop_title: bool,
    title_join: str,
    unescape: bool,
    repairs: Repairs,
) -> tuple[list[str], list[int]]:
    """Rows ``"class","title","body"`` (or ``"class","text"``), classes 1-based -> 0-based."""
    texts: list[str] = []
    labels: list[int] = []
    rows = 0
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(1 << 28)  # Yelp reviews exceed csv's default 128 KB field limit
    try:
        reader = csv.reader(text for _, text in decoded_lines(lines_of(path), path, repairs))
        for row in reader:
            rows += 1
            line = reader.line_num
            if len(row) != columns:
                raise InputError(
                    path,
                    f"row has {len(row)} columns, expected {columns} ({'class, title, body' if columns == 3 else 'class, text'})",
                    line=line,
                    fix='check the file is the Zhang et al. CSV of this dataset (no header row, fields in double quotes with "" for a quote)',
                )
            try:
                label = int(row[0]) - 1
            except ValueError:
                label = -1
            if not 0 <= label < num_classes:
                raise InputError(
                    path,
                    f"unknown label {row[0]!r}: expected a class number from 1 to {num_classes}",
                    line=line,
                    fix="remove a header row if there is one, or check that classes.txt / the dataset name matches this file",
                )
            fields = [f.replace("\\n", "\n") if unescape else f for f in row[1:]]
            text = join_text_fields(fields[1:] if drop_title else fields, title_join)
            if not text:
                repairs.record("empty_text", path, line, "empty text")
                continue
            texts.append(text)
            labels.append(label)
    except csv.Error as err:
        raise InputError(
            path,
            f"malformed CSV ({err})",
            line=reader.line_num,
            fix="check the quoting of this row; the file may be truncated",
        ) from err
    finally:
        csv.field_size_limit(previous_limit)
    if rows == 0:
        raise InputError(
            path,
            "the file has no rows",
            fix="point the source at the complete CSV (the download or copy may have failed)",
        )
    repairs.check(path, rows)
    return texts, labels


def read_trec(
    path: Path, label_names: tuple[str, ...], repairs: Repairs
) -> tuple[list[str], list[int]]:
    """``COARSE:fine question`` per line -> the coarse class (TREC-6)."""
    texts: list[str] = []
    labels: list[int] = []
    rows = 0
    for line, text in decoded_lines(lines_of(path), path, repairs):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        rows += 1
        tag, _, question = text.partition(" ")
        coarse, colon, _fine = tag.partition(":")
        if not colon:
            raise InputError(
                path,
                f"line does not start with 'COARSE:fine' ({tag!r})",
                line=line,
                fix="check that this is a TREC label file (train_5500.label / TREC_10.label)",
            )
        if coarse not in label_names:
            raise InputError(
                path,
                f"unknown label {coarse!r}; known: {', '.join(label_names)}",
                line=line,
                fix="check that this is a TREC-6 label file",
            )
        if not question.strip():
            repairs.record("empty_text", path, line, "empty question")
            continue
        texts.append(question.strip())
        labels.append(label_names.index(coarse))
    if rows == 0:
        raise InputError(
            path,
            "the file has no questions",
            fix="point the source at the complete TREC label file",
        )
    repairs.check(path, rows)
    return texts, labels


def _review_files(folder: Path) -> list[Path]:
    # aclImdb names reviews <id>_<rating>.txt; numeric order keeps the output reproducible.
    def key(p: Path) -> tuple[int, str]:
        head = p.stem.split("_")[0]
        return (int(head) if head.isdigit() else -1, p.name)

    return sorted(folder.glob("*.txt"), key=key)


def read_text_files(
    folder: Path, repairs: Repairs, label: int, texts: list[str], labels: list[int]
) -> None:
    files = _review_files(folder)
    for path in files:
        raw = decode(path.read_bytes(), path, None, repairs, group=folder)
        text = _BREAK.sub("\n", raw).strip()
        if not text:
            repairs.record("empty_text", path, None, "empty text", group=folder)
            continue
        texts.append(text)
        labels.append(label)
    repairs.check(folder, len(files))


def read_unsup(path: Path, repairs: Repairs) -> list[str]:
    """Unlabelled reviews: a folder of ``.txt`` files, or a CSV(.gz) with a ``text`` column."""
    texts: list[str] = []
    labels: list[int] = []
    if path.is_dir():
        read_text_files(path, repairs, -1, texts, labels)
        return texts
    reader = csv.reader(text for _, text in decoded_lines(lines_of(path), path, repairs))
    header = next(reader, None)
    if header is None:
        raise InputError(path, "the file is empty", fix="point unsup_path at the complete file")
    if "text" not in header:
        raise InputError(
            path,
            f"no 'text' column in the header {header}",
            line=1,
            fix="give the CSV a header row with a 'text' column",
        )
    column = header.index("text")
    rows = 0
    for row in reader:
        rows += 1
        if len(row) != len(header):
            raise InputError(
                path,
                f"row has {len(row)} columns, the header {len(header)}",
                line=reader.line_num,
                fix="check the quoting of this row",
            )
        text = _BREAK.sub("\n", row[column]).strip()
        if not text:
            repairs.record("empty_text", path, reader.line_num, "empty text")
            continue
        texts.append(text)
    repairs.check(path, rows)
    return texts


def read_label_names(path: Path, repairs: Repairs) -> tuple[str, ...]:
    names = tuple(t.strip() for _, t in decoded_lines(lines_of(path), path, repairs) if t.strip())
    if not names:
        raise InputError(
            path, "classes.txt is empty", fix="restore classes.txt from the dataset archive"
        )
    return names


def open_parquet(path: Path, *, fix: str) -> pq.ParquetFile:
    """``path`` as a Parquet file (its schema read, its rows not yet); a file that is not
    Parquet is one :class:`InputError` ending with ``fix``."""
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(path, f"not a readable Parquet file ({err})", fix=fix) from err
