"""Config dataclass fields as command-line flags: one `--field-name` per field with the field's
metadata as help (`smviz.config.field_help`), and the values given typed by the field
(`smviz.config.with_overrides`, ConfigError naming the field)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

from smviz.config import field_help, parse_assignments, with_overrides


def _default_text(default: Any) -> str:
    if default is None or default == {} or default == () or default == []:
        return ""
    if isinstance(default, (tuple, list)):
        return f" (default {','.join(map(str, default))})"
    return f" (default {default})"


def _metavar(type_name: str) -> str:
    """`int | None` → INT, `tuple[str, ...]` → STR,STR,..."""
    base = type_name.replace(" | None", "").replace("None | ", "")
    if base.startswith(("tuple[", "list[")):
        item = base.split("[", 1)[1].split(",")[0].rstrip("]").strip()
        return f"{item.upper()},..."
    return base.upper()


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> list[str]:
    """One `--field-name VALUE` flag per field of the config dataclass `cls` (except `skip`), its help
    the field's metadata; values stay strings until `config_from_flags` types them. Returns the names."""
    names = []
    for f in field_help(cls):
        if f.name in skip:
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=_metavar(f.type),
                            help=f"{f.help}{_default_text(f.default)}")
        names.append(f.name)
    return names


def config_fields_text(cls: type, skip: Iterable[str] = ()) -> str:
    """The fields of `cls` as help lines: `  name (type): help (default ...)`."""
    return "\n".join(f"  {f.name} ({f.type}): {f.help}{_default_text(f.default)}" for f in field_help(cls) if f.name not in skip)


def config_from_flags(base: Any, args: argparse.Namespace, names: Iterable[str], pairs: Sequence[str] = ()) -> Any:
    """`base` with the flags given (not None) among `names` and the `--set KEY=VALUE` pairs, each value
    parsed to its field's type (ConfigError naming the field)."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return with_overrides(base, given | parse_assignments(pairs))
