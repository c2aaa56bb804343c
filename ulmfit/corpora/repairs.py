"""Decoding and the two defects that are repaired (with a count) instead of stopping the run.

Real releases of the paper's corpora (Howard & Ruder 2018, Section 4.1) carry small blemishes:
TREC's ``train_5500.label`` has one byte that is not UTF-8, and BBC News has one Latin-1 pound
sign. Dropping a whole corpus for one byte would be absurd, so invalid bytes and empty texts are
repaired and counted, within a budget: past ``max_repair_fraction`` of a file's rows the file is
wrong (another encoding, the wrong column), not slightly dirty, and the run stops. ``strict``
makes every repair fatal. Everything else (see docs/corpora.md) is fatal at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ulmfit.errors import InputError

_FIXES = {
    "invalid_bytes": "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or point the source at the original release",
    "empty_text": "remove the empty rows, or check that the text column is the one being read",
}


@dataclass
class Repairs:
    """Counts repairs per kind, keeps the first few locations, and enforces the budget."""

    strict: bool = False
    max_fraction: float = 0.01
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    _per_file: Counter = field(default_factory=Counter)

    def record(
        self,
        kind: str,
        path: str | Path,
        line: int | None,
        message: str,
        *,
        group: str | Path | None = None,
    ) -> None:
        """Count one repair; ``group`` (default ``path``) is the unit whose budget it uses, such
        as the folder of a one-review-per-file corpus."""
        if self.strict:
            raise InputError(
                path,
                message,
                line=line,
                fix=_FIXES[kind] + " (or run with strict=False to repair it)",
            )
        self.counts[kind] += 1
        self._per_file[(kind, str(group if group is not None else path))] += 1
        where = f"{path}:{line}" if line is not None else str(path)
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(where)

    def check(self, path: str | Path, rows: int) -> None:
        """Stop when one file needed more repairs than its budget allows."""
        for kind in _FIXES:
            n = self._per_file[(kind, str(path))]
            if n > max(1.0, self.max_fraction * rows):
                first = next(
                    (e for e in self.examples.get(kind, []) if e.startswith(str(path))), str(path)
                )
                raise InputError(
                    path,
                    f"{n} of {rows} rows needed repair ({kind.replace('_', ' ')}, first at {first}): "
                    "more than max_repair_fraction, so the file is probably not what the source expects",
                    fix=_FIXES[kind],
                )

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}


def decode(
    raw: bytes,
    path: str | Path,
    line: int | None,
    repairs: Repairs,
    *,
    group: str | Path | None = None,
) -> str:
    """UTF-8, or (counted) cp1252 with Latin-1 for its five undefined bytes.

    cp1252 is what stray bytes in these English corpora are (BBC's 0xA3 is a pound sign); for
    TREC's lone 0xF0 no encoding is right, and cp1252 keeps one visible character in its place.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        repairs.record(
            "invalid_bytes",
            path,
            line,
            f"byte 0x{raw[err.start]:02X} at offset {err.start} is not UTF-8",
            group=group,
        )
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decoded_lines(
    lines: Iterable[bytes], path: str | Path, repairs: Repairs
) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` for each line of a binary stream (newline kept)."""
    for number, raw in enumerate(lines, start=1):
        yield number, decode(raw, path, number, repairs)
