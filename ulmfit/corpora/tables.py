"""Your own labelled data (docs/own-data.md): a table (CSV, TSV, JSON Lines, Parquet) or a folder
with one sub-folder per class, read into the same splits as the paper's datasets (Howard & Ruder
2018, Section 4.1), so that any labelled text collection can go through LM fine-tuning
(Section 3.2) and classifier fine-tuning (Section 3.3).

The published corpora have known blemishes that are repaired and counted (see ``repairs.py``).
Here the file is the user's own and the user can fix it, so every defect is fatal at once. It is
an :class:`InputError` naming the file, the line (or row) and the fix. Tables are read whole into
memory.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ulmfit.corpora.archive import ExtractLimits, check_format, open_stream, sniff_format
from ulmfit.corpora.download import Progress
from ulmfit.corpora.readers import RawData, join_text_fields, open_parquet
from ulmfit.corpora.sources import (
    FORMATS,
    LAYOUTS,
    DatasetSource,
    InputLog,
    fetch_given,
    unpack,
)
from ulmfit.errors import InputError

_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
#: A sub-folder of this name holds unlabelled texts (LM fine-tuning only); it is never a class.
UNSUP = "unsup"
_ENCODING_FIX = (
    "save the file as UTF-8, or set encoding: to the encoding it was written in "
    "(for example encoding: latin-1, cp1252 or utf-16)"
)


# ----------------------------------------------------------------------------------- reading


@dataclass
class Table:
    """The wanted columns of one file: values (``None`` where absent), and for each row the
    line it starts on (CSV, TSV, JSON Lines) or its 1-based row number (Parquet, JSON array)."""

    path: Path
    values: dict[str, list[Any]]
    lines: list[int]


def table_format(path: Path, fmt: str | None) -> str:
    """``format`` if given, else the one the extension names (``.csv.gz`` is a CSV)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(
                path,
                f"unknown format {fmt!r}",
                fix=f"set format: to one of {', '.join(FORMATS)} (or null to go by the extension)",
            )
        return fmt
    name = path.name.lower()
    for compressed in (".gz", ".bz2", ".xz"):
        name = name.removesuffix(compressed)
    suffix = Path(name).suffix
    if suffix not in _EXTENSIONS:
        raise InputError(
            path,
            f"cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"known: {', '.join(_EXTENSIONS)}",
            fix=f"rename the file, or set format: to one of {', '.join(FORMATS)}",
        )
    return _EXTENSIONS[suffix]


def decode_text(data: bytes, path: Path, encoding: str) -> str:
    """``data`` in ``encoding`` (a UTF-8 byte order mark is dropped); a failure names the line."""
    try:
        return data.decode(encoding).removeprefix("\ufeff")
    except LookupError:
        raise InputError(
            path,
            f"unknown encoding {encoding!r}",
            fix="set encoding: to a Python codec name such as utf-8, latin-1, cp1252 or utf-16",
        ) from None
    except UnicodeDecodeError as err:
        utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff")) and "16" not in encoding
        raise InputError(
            path,
            f"byte 0x{data[err.start]:02X} at offset {err.start} is not valid {encoding}: "
            f"the file is not in the {encoding} encoding expected"
            + (" (it starts with a UTF-16 byte order mark: encoding: utf-16)" if utf16 else ""),
            line=data[: err.start].count(b"\n") + 1,
            fix=_ENCODING_FIX,
        ) from None


def _file_bytes(path: Path) -> bytes:
    """The whole file, decompressed when it is gzip, bz2 or xz (an empty file or an HTML page
    saved under the data's name is reported as such)."""
    fmt = sniff_format(path)
    if fmt == "html":
        check_format(path)  # raises, naming it as an HTML page
    if fmt in ("gzip", "bz2", "xz"):
        with open_stream(path) as stream:
            data = stream.read()
    else:
        data = path.read_bytes()
    if not data.strip():
        raise InputError(path, "the file is empty", fix="point the source at the complete file")
    return data


def _check_columns(path: Path, columns: Sequence[str], wanted: Sequence[str], line: int | None):
    for column in wanted:
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(
                path,
                f"no column {column!r}{hint}; the columns are: {', '.join(map(repr, columns))}",
                line=line,
                fix="set text_columns: and label_column: to columns of this file, or rename them in the file",
            )


def _read_delimited(path: Path, delimiter: str, wanted: Sequence[str], encoding: str) -> Table:
    """CSV/TSV with a header row; quoted fields may hold delimiters and newlines."""
    text = decode_text(_file_bytes(path), path, encoding)
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(1 << 28)  # long documents exceed csv's default 128 KB field limit
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader, [])]
        if len(header) == 1 and (other := next((d for d in ";\t|" if d in header[0]), None)):
            raise InputError(
                path,
                f"the header {header[0]!r} is one column: the fields seem to be separated by {other!r}",
                line=1,
                fix="save the file with commas (CSV) or tabs (TSV, format: tsv)",
            )
        _check_columns(path, header, wanted, 1)
        index = {column: header.index(column) for column in wanted}
        table = Table(path, {column: [] for column in wanted}, [])
        previous = reader.line_num
        for row in reader:
            start, previous = previous + 1, reader.line_num
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise InputError(
                    path,
                    f"row has {len(row)} fields, the header {len(header)}",
                    line=start,
                    fix='check the quoting of this row: a field holding the delimiter, a quote or a newline must be in double quotes, with "" for a quote',
                )
            for column, i in index.items():
                table.values[column].append(row[i])
            table.lines.append(start)
    except csv.Error as err:
        raise InputError(
            path,
            f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({err})",
            line=reader.line_num,
            fix="check the quoting of this row; the file may be truncated",
        ) from err
    finally:
        csv.field_size_limit(previous_limit)
    return table


def _read_json(path: Path, wanted: Sequence[str], encoding: str) -> Table:
    """JSON Lines (one object per line), or a ``.json`` file holding one array of objects."""
    text = decode_text(_file_bytes(path), path, encoding)
    records: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise InputError(
                path, f"not valid JSON ({err.msg})", line=err.lineno, fix="check the JSON syntax"
            ) from None
    else:
        # Split on "\n" only: str.splitlines would also cut at U+2028, which JSON may hold raw.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputError(
                    path,
                    f"not valid JSON ({err.msg})",
                    line=number,
                    fix="write one JSON object per line (JSON Lines), with newlines inside texts escaped as \\n",
                ) from None
    for number, record in records:
        if not isinstance(record, dict):
            raise InputError(
                path,
                f"expected a JSON object, found {type(record).__name__}",
                line=number,
                fix='each record must be an object such as {"text": "...", "label": "..."}',
            )
    columns = list(dict.fromkeys(key for _, record in records for key in record))
    if records:
        _check_columns(path, columns, wanted, None)
    return Table(
        path,
        {column: [record.get(column) for _, record in records] for column in wanted},
        [number for number, _ in records],
    )


def _read_parquet(path: Path, wanted: Sequence[str]) -> Table:
    handle = open_parquet(path, fix="check that the file is Parquet, or set format: to what it is")
    _check_columns(path, handle.schema_arrow.names, wanted, None)
    data = handle.read(columns=list(dict.fromkeys(wanted)))
    return Table(
        path,
        {column: data.column(column).to_pylist() for column in wanted},
        list(range(1, data.num_rows + 1)),
    )


def read_table(path: Path, fmt: str | None, wanted: Sequence[str], encoding: str) -> Table:
    """The ``wanted`` columns of a CSV, TSV, JSON Lines, JSON or Parquet file."""
    fmt = table_format(path, fmt)
    if fmt == "parquet":
        table = _read_parquet(path, wanted)
    elif fmt in ("jsonl", "json"):
        table = _read_json(path, wanted, encoding)
    else:
        table = _read_delimited(path, "\t" if fmt == "tsv" else ",", wanted, encoding)
    if not table.lines:
        raise InputError(
            path,
            "the file has no data rows" + (" (only a header)" if fmt in ("csv", "tsv") else ""),
            fix="point the source at the complete file",
        )
    return table


def _field(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def label_string(value: Any) -> str | None:
    """A label as text: ``1`` and ``1.0`` become ``"1"``; ``None``, NaN and blanks are missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def table_texts(table: Table, text_columns: Sequence[str], title_join: str) -> list[str]:
    """One text per row, several columns joined as the built-in title and body are."""
    texts = []
    for i, line in enumerate(table.lines):
        text = join_text_fields([_field(table.values[c][i]) for c in text_columns], title_join)
        if not text:
            raise InputError(
                table.path,
                f"empty text in row {i + 1} (column {', '.join(text_columns)})",
                line=line,
                fix="fill in the text or delete the row; check that text_columns names the text",
            )
        texts.append(text)
    return texts


def table_labels(table: Table, label_column: str) -> list[str]:
    labels = []
    for i, line in enumerate(table.lines):
        label = label_string(table.values[label_column][i])
        if label is None:
            raise InputError(
                table.path,
                f"no label in row {i + 1} (column {label_column!r})",
                line=line,
                fix="fill in the label or delete the row; unlabelled texts belong in unsup_path",
            )
        labels.append(label)
    return labels


# ----------------------------------------------------------------------------------- folders


def _text_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _read_files(files: Sequence[Path], encoding: str) -> list[str]:
    texts = []
    for path in files:
        text = decode_text(path.read_bytes(), path, encoding).strip()
        if not text:
            raise InputError(
                path,
                "empty text (the file is empty or whitespace only)",
                fix="fill it in or delete it",
            )
        texts.append(text)
    return texts


def read_class_folders(root: Path, encoding: str) -> tuple[list[str], list[str]]:
    """``<root>/<class>/**/*.txt`` -> texts and their class names (fastai/Keras ``from_folder``)."""
    classes = sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != UNSUP
    )
    if not classes:
        raise InputError(
            root,
            "no class sub-folders found (expected <class>/<name>.txt)",
            fix="put each class's .txt files in a sub-folder named after the class",
        )
    texts: list[str] = []
    labels: list[str] = []
    for folder in classes:
        files = _text_files(folder)
        if not files:
            raise InputError(
                folder,
                "no .txt files in this class folder",
                fix="add the class's texts as .txt files, or remove the folder",
            )
        texts += _read_files(files, encoding)
        labels += [folder.name] * len(files)
    return texts, labels


def read_unlabelled(
    path: Path, src: DatasetSource, text_columns: Sequence[str], encoding: str
) -> list[str]:
    """Unlabelled texts: a folder of ``.txt`` files, or a table with the text columns."""
    if path.is_dir():
        files = _text_files(path)
        if not files:
            raise InputError(
                path, "no .txt files in the unlabelled folder", fix="add them or remove it"
            )
        return _read_files(files, encoding)
    return table_texts(
        read_table(path, src.format, text_columns, encoding), text_columns, src.title_join
    )


# ----------------------------------------------------------------------------------- labels


def _names(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:12])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 12 else "")


def decide_label_names(
    given: Sequence[Any] | None, train_labels: Sequence[str], where: Path, origin: str
) -> tuple[tuple[str, ...], str]:
    """``label_names`` if given, else the training labels sorted (numerically when all are
    integers, so that 10 comes after 9); and a note saying which."""
    if given is not None:
        names = tuple(label_string(n) or "" for n in given)
        duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
        if duplicates or "" in names:
            raise InputError(
                where,
                f"label_names has {'duplicates ' + _names(duplicates) if duplicates else 'an empty name'}",
                fix="list each label once in label_names",
            )
        note = f"label order: as given in label_names ({len(names)} labels)"
    else:
        found = set(train_labels)
        integers = all(re.fullmatch(r"-?[0-9]+", n) for n in found)
        names = tuple(sorted(found, key=int) if integers else sorted(found))
        note = f"label order: the {len(names)} {origin} found in the training data, sorted" + (
            " as numbers" if integers else ""
        )
    if len(names) < 2:
        raise InputError(
            where,
            f"only one class ({_names(names)}): a classifier needs at least two",
            fix="add texts of the other classes (or check label_column)",
        )
    return names, note


def encode_labels(
    labels: Sequence[str],
    names: tuple[str, ...],
    given: bool,
    where: Path,
    lines: Sequence[int | None],
) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    out = []
    for label, line in zip(labels, lines, strict=True):
        if label not in index:
            # A text file's label is its folder: name that folder.
            where = where / label if line is None else where
            if given:
                message = f"label {label!r} is not in label_names ({_names(names)})"
                fix = "add it to label_names, or correct the label"
            else:
                message = f"label {label!r} never occurs in the training data ({_names(names)})"
                fix = "correct the label, or add training rows of this class"
            raise InputError(where, message, line=line, fix=fix)
        out.append(index[label])
    return out


def check_class_sizes(
    where: Path, labels: Sequence[int], names: tuple[str, ...], *, cut_test: bool, valid: bool
) -> None:
    """Every class needs a row for train plus one for each split cut from it: ``stratified_split``
    holds out at least one row of a class of two or more, but none of a class of one."""
    splits = ["train"] + (["valid"] if valid else []) + (["test"] if cut_test else [])
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    for name, count in zip(names, counts.tolist(), strict=True):
        if count < len(splits):
            raise InputError(
                where,
                f"class {name!r} has {count} training row(s): too few to stratify into "
                f"{' and '.join(splits)} (at least {len(splits)} needed)",
                fix="add rows of this class or remove it"
                + ("; or give a test split with test_path" if cut_test else ""),
            )


def shared_texts(train: Sequence[str], test: Sequence[str]) -> int:
    """How many test rows have a text that also occurs in ``train`` (exact duplicates)."""
    seen = set(train)
    return sum(text in seen for text in test)


# ----------------------------------------------------------------------------------- layouts


def _text_columns(src: DatasetSource) -> tuple[str, ...]:
    columns = src.text_columns
    return (columns,) if isinstance(columns, str) else tuple(columns)


def _folder_tree(local: Path, cache_dir: Path, src: DatasetSource) -> Path:
    """A folder as given; an archive extracted, and its lone top folder entered."""
    if local.is_dir():
        return local
    limits = ExtractLimits(max_total_bytes=src.max_extract_bytes, max_ratio=src.max_extract_ratio)
    tree = unpack(local, cache_dir, limits)
    if not tree.is_dir():
        raise InputError(
            local,
            "layout folder needs a folder (or a .tar.gz/.zip of one), got a file",
            fix="point path at the folder holding one sub-folder per class, or use layout: table",
        )
    children = [c for c in tree.iterdir() if not c.name.startswith(".")]
    while len(children) == 1 and children[0].is_dir() and children[0].name != "train":
        tree = children[0]
        children = [c for c in tree.iterdir() if not c.name.startswith(".")]
    return tree


def _labelled(
    src: DatasetSource, location: Path, cache_dir: Path
) -> tuple[list[str], list[str], list[int | None], Path]:
    """Texts, label strings and lines (``None`` for files) of one labelled split, and the
    file or class-folder root they came from."""
    columns = _text_columns(src)
    if src.layout == "folder":
        root = _folder_tree(location, cache_dir, src)
        texts, labels = read_class_folders(root, src.encoding)
        return texts, labels, [None] * len(texts), root
    if location.is_dir():
        raise InputError(
            location,
            "layout table needs a file, got a folder",
            fix="point path (or train_path) at the CSV/TSV/JSON Lines/Parquet file, or use layout: folder",
        )
    table = read_table(location, src.format, (*columns, src.label_column), src.encoding)
    texts = table_texts(table, columns, src.title_join)
    return texts, table_labels(table, src.label_column), table.lines, location


def read_own(
    src: DatasetSource, cache_dir: Path, progress: Progress, log: InputLog
) -> tuple[RawData, list[str]]:
    """Read ``src`` in the ``table`` or ``folder`` layout; returns the data (labels 0-based in
    the order decided here) and notes for ``summary.json``."""
    if src.layout not in LAYOUTS:
        raise InputError(
            src.name,
            f"unknown layout {src.layout!r}",
            fix="set layout: table (CSV, TSV, JSON Lines, Parquet) or layout: folder (one sub-folder per class)",
        )
    if not _text_columns(src):
        raise InputError(src.name, "text_columns is empty", fix="name the text column(s)")
    source = src.train_path or src.path or src.url
    if source is None:
        raise InputError(
            src.name,
            f"layout {src.layout} needs the data's location",
            fix="set path: (one file or folder, cut into splits) or train_path: (and test_path:)",
        )
    sha256 = src.sha256 if source in (src.path, src.url) else None  # it checks path/url only
    train = fetch_given(source, "train", cache_dir, progress, log, sha256=sha256)
    test = fetch_given(src.test_path, "test", cache_dir, progress, log)
    unsup = fetch_given(src.unsup_path, "unsup", cache_dir, progress, log)
    if src.layout == "folder":
        # train/, test/ and unsup/ above the class folders are found without test_path etc.
        tree = _folder_tree(train, cache_dir, src)
        if (tree / "train").is_dir():
            if test is None and (tree / "test").is_dir():
                test = tree / "test"
            if unsup is None:
                unsup = next(
                    (d for d in (tree / UNSUP, tree / "train" / UNSUP) if d.is_dir()), None
                )
            tree = tree / "train"
        elif unsup is None and (tree / UNSUP).is_dir():
            unsup = tree / UNSUP
        train = tree
    train_texts, train_labels, train_lines, train = _labelled(src, train, cache_dir)
    progress("parse train", len(train_texts), len(train_texts))
    origin = "class folder names" if src.layout == "folder" else f"values of {src.label_column!r}"
    names, note = decide_label_names(src.label_names, train_labels, train, origin)
    given = src.label_names is not None
    raw = RawData(names, train_texts=train_texts)
    raw.train_labels = encode_labels(train_labels, names, given, train, train_lines)
    cut_test = test is None and src.test_fraction > 0
    check_class_sizes(
        train, raw.train_labels, names, cut_test=cut_test, valid=src.valid_fraction > 0
    )
    if test is not None:
        raw.test_texts, test_labels, test_lines, test = _labelled(src, test, cache_dir)
        raw.test_labels = encode_labels(test_labels, names, given, test, test_lines)
    if unsup is not None:
        raw.unsup_texts = read_unlabelled(unsup, src, _text_columns(src), src.encoding)
    return raw, [note]
