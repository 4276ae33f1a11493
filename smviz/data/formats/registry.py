"""The data-format registry: `DataFormat` (what kind of data a format holds — `facts`, `qa`,
`documents`, `edits` —, how to recognise a file of it by content, how to read it into smviz's canonical
records), `register_format`, `get_format`, `detect`, `read_data`, and `load_records`, which reads a
file's objects. The built-in formats are registered by `smviz.data.formats` (the package).

Files are JSONL (one object per line) or, for the editing benchmarks' layouts, one JSON list;
`load_records` reads either, with errors that name the file and the line (or record index)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smviz.errors import ConfigError, InputError

KINDS = ("facts", "qa", "documents", "edits")
KIND_NOUNS = {"facts": "facts", "qa": "Q/A items", "documents": "documents", "edits": "editing records"}
"""How messages name the records of each kind."""
MAX_LINE_CHARS = 1_000_000
"""A longer JSONL line is refused (a whole corpus on one line is almost always a mistake)."""


@dataclass(frozen=True)
class Records:
    """The parsed objects of a file: `layout` "jsonl" (where[i] = line number) or "json" (a list;
    where[i] = index in it)."""

    path: Path
    layout: str
    objects: list[Any]
    where: list[int]

    def location(self, i: int) -> str:
        return f"{self.path}, line {self.where[i]}" if self.layout == "jsonl" else f"{self.path}, record {self.where[i]}"


@dataclass(frozen=True)
class DataFormat:
    name: str
    kind: str  # one of KINDS
    help: str
    sniff: Callable[[Records], bool]
    """True when the file's records look like this format (checked on the first record)."""
    read: Callable[[Records], list[Any]]
    """The canonical records (Fact, QAItem, Document or EditRecord), validated; InputError naming the
    file and line otherwise."""


_FORMATS: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> DataFormat:
    if fmt.name in _FORMATS:
        raise ConfigError(f"a data format named {fmt.name!r} is already registered")
    if fmt.kind not in KINDS:
        raise ConfigError(f"data format {fmt.name!r}: kind must be one of {', '.join(KINDS)}, got {fmt.kind!r}")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> DataFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown data format {name!r}; choose one of {', '.join(_FORMATS)}") from None


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def data_formats() -> tuple[DataFormat, ...]:
    """The registered formats, in detection order."""
    return tuple(_FORMATS.values())


def read_text(path: str | os.PathLike) -> tuple[bytes, str]:
    """The bytes of the file at `path` and their text; InputError naming the file (and the line of the
    first byte that is not UTF-8) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: the file is not UTF-8 text (byte {raw[e.start]:#x}); save it as UTF-8") from None


def load_records(path: str | os.PathLike) -> Records:
    """The objects of a JSONL file, or of a file holding one JSON list (detected by its first
    character). Blank lines are skipped; an empty file has no objects."""
    path = Path(path)
    _, text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return Records(path, "jsonl", [], [])
    if stripped[0] == "[":
        try:
            objects = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {e.lineno}: not a valid JSON list ({e.msg})") from None
        if not isinstance(objects, list):
            raise InputError(f"{path}, line 1: a JSON value that is not a list")
        return Records(path, "json", objects, list(range(len(objects))))
    objects, where = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"{path}, line {number}: {len(line):,} characters, more than {MAX_LINE_CHARS:,} on one line; "
                             "split it into several records")
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError as e:
            hint = " (a JSON document over several lines? smviz reads JSONL: one object per line)" if number == 1 else ""
            raise InputError(f"{path}, line {number}: not valid JSON ({e.msg}){hint}") from None
        where.append(number)
    return Records(path, "jsonl", objects, where)


def detect(records: Records) -> DataFormat:
    """The registered format whose `sniff` accepts `records` (the first match in registration order)."""
    if not records.objects:
        raise InputError(f"{records.path} holds no records")
    for fmt in _FORMATS.values():
        if fmt.sniff(records):
            return fmt
    first = records.objects[0]
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise InputError(f"{records.location(0)}: cannot tell the data format from the first record (keys {keys}); "
                     f"name it with --format ({', '.join(_FORMATS)})")


def detect_kind(records: Records, kind: str, default: str) -> DataFormat:
    """The first registered format of `kind` whose `sniff` accepts `records`, else format `default`
    (whose reader then says what is wrong with the records)."""
    for fmt in _FORMATS.values():
        if fmt.kind == kind and records.objects and fmt.sniff(records):
            return fmt
    return get_format(default)


def jsonl_objects(records: Records, format_name: str) -> list[tuple[str, Any]]:
    """(location, object) of each record of a JSONL-only format; a JSON list is refused."""
    if records.layout != "jsonl":
        raise InputError(f"{records.path}, line 1: a JSON list, but {format_name!r} files are JSONL "
                         "(one JSON object per line, no enclosing [ ])")
    return [(records.location(i), obj) for i, obj in enumerate(records.objects)]


def first_object(records: Records) -> dict[str, Any] | None:
    """The first record if it is a JSON object (what sniffs look at), else None."""
    first = records.objects[0] if records.objects else None
    return first if isinstance(first, dict) else None


def record_id(obj: dict[str, Any], default: str) -> str:
    """A record's optional "id" (a string or an integer) as a string, `default` when absent."""
    value = obj.get("id", default)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise InputError(f"'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def read_data(path: str | os.PathLike, format: str | None = None) -> tuple[DataFormat, list[Any]]:
    """(format, canonical records) of the file at `path`; the format is detected unless named."""
    named = get_format(format) if format is not None else None  # an unknown name is refused before reading
    records = load_records(path)
    fmt = named or detect(records)
    return fmt, fmt.read(records)
