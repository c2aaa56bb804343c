"""Building frozen config dataclasses from plain dicts, checking every value on the way.

A field's constraints are declared once, in its type hint, with ``typing.Annotated``::

    epochs: PositiveInt = 1
    amp: Annotated[str, OneOf(AMP_SETTINGS)] = "auto"
    input_dropout: Dropout = 0.6

:func:`from_dict` checks each value against its hint (type, then each constraint) and reports
every problem of the whole tree at once, as one :class:`ConfigError` listing them, each naming
its key path, the value given, what is allowed and the fix. Building a dataclass directly in
Python checks nothing here (its ``__post_init__`` may); the checks are for values read from a
file.

Types are strict: text where a number is wanted is an error, and so is a fraction where a whole
number is wanted. Two readings are accepted because YAML writes them naturally: a whole number
for a float field (``lr: 1``), and, for a float field only, text that is a plain float literal
(``lr: 1e-3``: PyYAML follows YAML 1.1, which reads ``1e-3`` without a dot as text).
``"0.01"`` and ``"1e-3"`` are accepted that way; ``"ten"``, ``"nan"``, ``"inf"``, ``"1_000"``,
``"0,01"`` are not, nor is a quoted number for a whole-number or text field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

T = TypeVar("T")

# A float written as text: what float() reads, minus inf, nan, underscores and spaces.
FLOAT_LITERAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


# ----------------------------------------------------------------------------- constraints


@dataclasses.dataclass(frozen=True)
class Range:
    """A number in ``[low, high]``; ``open_low`` / ``open_high`` exclude that end."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def check(self, value: Any, root: Path | None) -> str | None:
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.open_high else value > self.high
        )
        return self.describe() if below or above else None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {_num(self.low)}"
        return f"{'<' if self.open_high else '<='} {_num(self.high)}"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (an enumeration)."""

    values: tuple[Any, ...]

    def check(self, value: Any, root: Path | None) -> str | None:
        return None if value in self.values else self.describe()

    def describe(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Text matching ``regex`` (whole), described to the user as ``description``."""

    regex: str
    description: str

    def check(self, value: Any, root: Path | None) -> str | None:
        return None if re.fullmatch(self.regex, value) else self.description

    def describe(self) -> str:
        return self.description


@dataclasses.dataclass(frozen=True)
class Check:
    """Whatever ``predicate`` accepts, described to the user as ``description``."""

    predicate: typing.Callable[[Any], bool]
    description: str

    def check(self, value: Any, root: Path | None) -> str | None:
        return None if self.predicate(value) else self.description

    def describe(self) -> str:
        return self.description


@dataclasses.dataclass(frozen=True)
class NotEmpty:
    """A list with at least one value."""

    def check(self, value: Any, root: Path | None) -> str | None:
        return None if len(value) else self.describe()

    def describe(self) -> str:
        return "not empty"


@dataclasses.dataclass(frozen=True)
class LocalPath:
    """A file or folder that must exist, relative to the project root, when it is a local path:
    ``http(s)://`` URLs and ``package:`` paths are left to the stage that fetches them. Checked
    only when :func:`from_dict` is given ``root``."""

    fix = "correct the path (relative paths start at the project root), or leave it unset"

    def check(self, value: Any, root: Path | None) -> str | None:
        if root is None or re.match(r"(https?://|package:)", value):
            return None
        path = root / os.path.expanduser(value)
        return None if path.exists() else f"no such file or folder: {path.resolve()}"

    def describe(self) -> str:
        return "an existing file or folder, an http(s) URL or a package: path"


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, open_low=True)]
NonNegativeFloat = Annotated[float, Range(0)]
#: A probability of dropping, or a share that cannot be all: ``0 <= p < 1``.
Dropout = Annotated[float, Range(0, 1, open_high=True)]
#: A share strictly between none and all: ``0 < f < 1`` (a held-out fraction, STLR's cut_frac).
Fraction = Annotated[float, Range(0, 1, open_low=True, open_high=True)]
Text = Annotated[str, Check(lambda text: bool(text.strip()), "non-empty text")]
Sha256 = Annotated[str, Pattern(r"[0-9a-fA-F]{64}", "64 hexadecimal digits (a sha256)")]
#: Where PyTorch runs: ``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda[:N]``, ``mps``.
Device = Annotated[str, Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:<N> or mps")]


# -------------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad value: its key path, what is wrong (naming the value given and what is
    allowed) and the fix."""

    key: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}. Fix: {self.fix}"


class ConfigError(ValueError):
    """Every problem found, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def problems_of(error: Exception, key: str) -> list[Problem]:
    """The problems an exception reports: a :class:`ConfigError`'s own, else one problem at
    ``key`` with the exception's text (a ``__post_init__``'s cross-field check)."""
    if isinstance(error, ConfigError):
        return error.problems
    fix = getattr(error, "fix", None) or "correct the value"
    where = getattr(error, "path", None) or key
    message = getattr(error, "message", None) or str(error)
    return [Problem(where, message, fix)]


# -------------------------------------------------------------------------------- building


def from_dict(
    cls: type[T], data: Mapping[str, Any] | None, *, where: str = "", root: Path | None = None
) -> T:
    """Build dataclass ``cls`` from ``data``, checking every value (see the module docstring).

    Unknown keys, missing required keys, wrong types and values outside a field's constraints
    are all collected and raised together as :class:`ConfigError`, each named by its key path
    below ``where``. Nested dataclass fields are built recursively, a dict overriding only the
    fields it names of the field's default; lists become tuples so the result stays hashable and
    frozen. With ``root``, :class:`LocalPath` fields must exist relative to it.
    """
    problems: list[Problem] = []
    built = _build(cls, data or {}, where, problems, root)
    if problems:
        raise ConfigError(problems)
    return built


def check(
    cls: type, data: Mapping[str, Any], *, where: str = "", root: Path | None = None
) -> list[Problem]:
    """The problems of the values ``data`` gives for fields of ``cls`` (other keys are not
    looked at): for a caller that builds ``cls`` itself from parts checked elsewhere."""
    problems: list[Problem] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name in fields:
            hint = _hints(cls)[name]
            _convert(hint, value, _key(where, name), fields[name].default, problems, root)
    return problems


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _key(where: str, name: Any) -> str:
    return f"{where}.{name}" if where else str(name)


def _build(cls: type, data: Any, where: str, problems: list[Problem], root: Path | None) -> Any:
    if not isinstance(data, Mapping):
        problems.append(
            Problem(
                where or cls.__name__,
                f"got {_shown(data)}, expected a mapping of keys ({cls.__name__})",
                fix="write the section as 'key: value' lines indented under its name",
            )
        )
        return None
    before = len(problems)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            problems.append(
                Problem(
                    _key(where, name),
                    f"unknown key ({cls.__name__}); valid keys: {sorted(fields)}",
                    fix="correct the spelling, or remove the key",
                )
            )
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            problems.append(Problem(_key(where, name), "missing required key", "add it"))
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        default = fields[name].default
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            value.update(data[name])
        kwargs[name] = _convert(
            _hints(cls)[name], value, _key(where, name), default, problems, root
        )
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # a __post_init__'s own (cross-field) check
        problems.extend(problems_of(error, where or cls.__name__))
        return None


def _convert(
    hint: Any, value: Any, key: str, default: Any, problems: list[Problem], root: Path | None
) -> Any:
    """``value`` checked against ``hint`` (a problem appended when it fails) and converted:
    lists to tuples, whole numbers and float literals to floats."""
    nullable = ""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) < len(typing.get_args(hint)):
            if value is None:
                return None
            nullable = ", or null"
        hint = options[0] if len(options) == 1 else Any
    constraints: tuple[Any, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *rest = typing.get_args(hint)
        constraints = tuple(rest)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, problems, root)
    expected = _expected(hint, constraints) + nullable
    shown = _shown(value, hint)
    converted = _base(hint, value, key, problems, root)
    if converted is _BAD:
        problems.append(
            Problem(key, f"got {shown}, expected {expected}", _fix(hint, expected, default))
        )
        return None
    for constraint in constraints:
        reason = constraint.check(converted, root)
        if reason is not None:
            got = shown if reason == constraint.describe() else f"{shown} ({reason})"
            fix = getattr(constraint, "fix", None) or _fix(hint, expected, default)
            problems.append(Problem(key, f"got {got}, expected {expected}", fix))
            return None
    return converted


_BAD = object()


def _base(hint: Any, value: Any, key: str, problems: list[Problem], root: Path | None) -> Any:
    """``value`` as type ``hint``, or ``_BAD``; tuple elements are checked one by one."""
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _BAD
        return float(value) if math.isfinite(value) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            return _BAD
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            element_hints = [args[0]] * len(value)
        elif len(args) != len(value):
            return _BAD
        else:
            element_hints = list(args)
        return tuple(
            _convert(h, v, f"{key}[{i}]", dataclasses.MISSING, problems, root)
            for i, (h, v) in enumerate(zip(element_hints, value, strict=True))
        )
    return value  # Any, or a type this module does not check


def _expected(hint: Any, constraints: tuple[Any, ...]) -> str:
    """What is allowed, in words: ``a whole number >= 1``."""
    if typing.get_origin(hint) is Annotated:
        inner, *rest = typing.get_args(hint)
        return _expected(inner, tuple(rest))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_expected(a, ()) for a in options) + " or null"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        each = _expected(args[0], ())
        if len(args) == 2 and args[1] is Ellipsis:
            non_empty = any(isinstance(c, NotEmpty) for c in constraints)
            return f"a {'non-empty ' if non_empty else ''}list whose values are each {each}"
        return f"a list of {len(args)} values, each {each}"
    else:
        text = {
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            str: "text",
        }.get(hint, getattr(hint, "__name__", str(hint)))
    details = [c.describe() for c in constraints]
    if details and (hint is str or isinstance(constraints[0], OneOf)):
        return ", ".join(details)  # "one of adam, ntasgd" says it all
    return " ".join([text, *details])


def _fix(hint: Any, expected: str, default: Any) -> str:
    """Write what is allowed, in YAML, with the default as a reminder."""
    unquoted = ", without quotes" if hint in (int, float, bool) else ""
    if default is dataclasses.MISSING or dataclasses.is_dataclass(default):
        return f"write {expected}{unquoted}"
    return f"write {expected}{unquoted} (default: {_yaml(default)})"


def _shown(value: Any, hint: Any = None) -> str:
    """A value as given, named as text where text is not what the field takes."""
    if isinstance(value, str):
        return repr(value) if hint is str else f"{value!r} (text)"
    if isinstance(value, Mapping):
        return "a mapping"
    if value is None:
        return "null"
    return _yaml(value)


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def to_dict(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (tuples become lists, for YAML/JSON)."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(obj))
