"""What every config dataclass of smviz shares: values checked against the field's declared type,
unknown keys of a config read from disk ignored with a warning, `KEY=VALUE` overrides parsed to the
field's type, and the help text of each field (its `metadata={"help": ...}`) for `--help` and docs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from smviz.errors import ConfigError

log = logging.getLogger(__name__)

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class FieldHelp:
    name: str
    type: str
    default: Any
    help: str


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, name: str) -> Any:
    """`value` as a value of type `tp` (int, float, bool, str, None, unions, tuples/lists of those),
    or a ConfigError naming the field. Strings from the command line are parsed (`"3"` for an int,
    `"a,b"` or `'["a","b"]'` for a tuple); a float must be finite."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(option, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} is none of {_type_name(tp)}")
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise ConfigError(f"{name}: {value!r} is not a list") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        items = [coerce(args[0], v, name) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            number = None
        if number is None:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name} must be null, got {value!r}")
    raise TypeError(f"smviz.config cannot check fields of type {tp!r} ({name})")  # a programming error


def from_dict(cls: type[C], d: dict[str, Any], *, what: str | None = None) -> C:
    """An instance of the dataclass `cls` from `d` as read from disk or given by a user: every value
    checked against its field's type (ConfigError naming the field), unknown keys ignored with a
    warning (a newer smviz may have written them)."""
    what = what or cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(d).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        log.warning("%s: ignoring unknown fields %s (written by a newer smviz?)", what, unknown)
    values = {name: coerce(hints[name], d[name], f"{what}.{name}") for name in names if name in d}
    return cls(**values)


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings as a dict of strings (typing is `from_dict`'s job)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def with_overrides(config: C, overrides: dict[str, Any]) -> C:
    """`config` with some fields replaced, each value checked (and parsed, if a string) as its field's type."""
    cls = type(config)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field {', '.join(unknown)}; its fields: {', '.join(sorted(names))}")
    values = {k: coerce(hints[k], v, k) for k, v in overrides.items()}
    return dataclasses.replace(config, **values)


def field_help(cls: type) -> Iterator[FieldHelp]:
    """Name, type, default and help of each field of the dataclass `cls`, in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        yield FieldHelp(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", ""))
