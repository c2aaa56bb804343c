"""Building frozen config dataclasses from plain dicts, rejecting unknown keys."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``.

    Unknown keys raise ``ValueError`` naming the key, the section (``where``) and the valid
    keys. Nested dataclass fields are built recursively, a dict overriding only the fields it
    names of the field's default; lists become tuples so the result stays hashable and frozen.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f" in section '{where}'" if where else ""
        raise ValueError(
            f"unknown key(s) {unknown}{section} for {cls.__name__}; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)} | value
        kwargs[name] = _coerce(hints.get(name), value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    candidates = [hint]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        candidates = [a for a in typing.get_args(hint) if a is not type(None)]
    for c in candidates:
        if dataclasses.is_dataclass(c) and isinstance(value, dict):
            return from_dict(c, value, where=where)
    if isinstance(value, list):
        element = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        return tuple(_number(element, v, where) for v in value)
    return _number(hint, value, where)


def _number(hint: Any, value: Any, where: str) -> Any:
    """A float field's int, or its string such as ``1e-3`` (YAML 1.1 reads that as text), as a
    float; anything else unchanged."""
    if hint is not float or isinstance(value, bool) or not isinstance(value, int | str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (tuples become lists, for YAML/JSON)."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(obj))
