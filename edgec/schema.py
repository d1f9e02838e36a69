"""Typed records from TOML/JSON tables, with errors that name the file, the key and the type.

Every config in edgec is a frozen dataclass. :func:`from_dict` builds one from a parsed
table and checks, for every key, that it is known (with a did-you-mean when it is not) and of
the declared type; :func:`to_dict` is its inverse, so each config round-trips through JSON.
Range checks live in each dataclass's ``__post_init__`` and raise ``ValueError``; they are
reported with the same location.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError, did_you_mean

T = TypeVar("T")

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "nothing"}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_describe(get_args(tp)[1])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


class _Bad(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except _Bad as exc:
                errors.append(exc)
        # a nested error inside a table is more useful than "expected X or Y"
        deeper = [e for e in errors if e.key != key]
        if deeper:
            raise deeper[0]
        raise _Bad(key, f"expected {_describe(tp)}, got {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no setting takes nan or inf; they would only fail later, far from here
                raise _Bad(key, f"expected a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(tp)
            return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        args = get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    elif origin is dict:
        if isinstance(value, dict):
            _, vt = get_args(tp)
            return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {tp!r} for {key}")
    raise _Bad(key, f"expected {_describe(tp)}, got {_show(value)}")


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise _Bad(key, f"unknown key '{name}' ({did_you_mean(name, fields)})")
        kwargs[name] = _convert(hints[name], value, key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise _Bad(key, f"missing required key '{missing[0]}' ({_describe(hints[missing[0]])})")
    try:
        return cls(**kwargs)
    except RangeError as exc:
        raise _Bad(f"{prefix}.{exc.key}" if prefix else exc.key, exc.message) from exc
    except ValueError as exc:
        raise _Bad(prefix or cls.__name__, str(exc)) from exc


def from_dict(cls: type[T], data: dict[str, Any], *, source: str, prefix: str = "") -> T:
    """Build ``cls`` from ``data``; raise :class:`ConfigError` naming ``source`` and the key."""
    try:
        return _build(cls, data, prefix)
    except _Bad as exc:
        raise ConfigError(f"{source}: {exc.key}: {exc.message}") from None


def to_dict(obj: Any) -> Any:
    """Plain JSON/TOML-able data from a config (enums become their values)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def doc(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, min: float | None = None,
        max: float | None = None, above: float | None = None) -> Any:
    """A dataclass field with a help text (used by ``edgec init`` to annotate the file) and, for a
    number, its sane range: ``min`` <= value <= ``max``, or ``above`` < value (see :func:`check_ranges`)."""
    metadata = {"help": help, "min": min, "max": max, "above": above}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def value_range(f: dataclasses.Field) -> str | None:
    """The field's range in words ("1 to 10000", "above 0 up to 10"), or None when it has none."""
    lo, hi, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("above")
    low = f"above {above:g}" if above is not None else (f"{lo:g}" if lo is not None else None)
    if low is None and hi is None:
        return None
    if hi is None:
        return f"at least {lo:g}" if above is None else low
    if low is None:
        return f"at most {hi:g}"
    return f"{low} up to {hi:g}" if above is not None else f"{low} to {hi:g}"


def check_ranges(obj: Any) -> None:
    """Raise ``ValueError`` naming the first numeric field of ``obj`` outside its declared range.

    Called from each config's ``__post_init__``, so values from a file, from the command line
    (through :func:`override`) and from Python are held to the same ranges."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lo, hi, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("above")
        if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and value <= above):
            shown = f"{value:g}" if isinstance(value, float) else (str(value) if len(str(value)) <= 24 else f"{value:.3g}")
            raise RangeError(f.name, f"must be {value_range(f)}, got {shown}")


class RangeError(ValueError):
    """A number outside its field's range; ``key`` is the field."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}")
        self.key = key
        self.message = message


def override(obj: T, values: dict[str, Any], *, source: str = "command line", names: dict[str, str] | None = None) -> T:
    """``obj`` with ``values`` (None entries ignored) set, checked like the same keys in a file:
    types and ranges; a :class:`ConfigError` names the option (``names`` maps key -> "--option")."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return obj
    names = names or {}
    hints = get_type_hints(type(obj))
    try:
        converted = {k: _convert(hints[k], v, names.get(k, k)) for k, v in values.items()}
        return dataclasses.replace(obj, **converted)
    except _Bad as exc:
        raise ConfigError(f"{exc.key}: {exc.message}" if exc.key.startswith("-") else
                          f"{source}: {exc.key}: {exc.message}") from None
    except RangeError as exc:
        key = names.get(exc.key, exc.key)
        raise ConfigError(f"{key}: {exc.message}" if key.startswith("-") else f"{source}: {key}: {exc.message}") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


__all__ = ["from_dict", "to_dict", "doc", "check_ranges", "override", "value_range"]
