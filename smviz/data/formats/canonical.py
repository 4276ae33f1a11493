"""smviz's canonical form of each kind of data, as JSONL (what `smviz data convert` writes):
facts as `smviz.data.facts` writes them, QA items as `{"id", "question", "answers"}`, documents as
`{"id", "text"}`, editing records as `EditRecord.to_dict()`. `write_canonical` writes one atomically
(format `edits`, `smviz.data.formats.smviz_edits`, reads the editing records back)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from smviz.data.edits import EditRecord
from smviz.data.facts import write_facts
from smviz.data.formats.qa import QAItem
from smviz.data.formats.registry import KINDS
from smviz.data.schema import Document, Fact
from smviz.errors import ConfigError
from smviz.io import atomic_open, json_text


_KIND_OF = {Fact: "facts", QAItem: "qa", Document: "documents", EditRecord: "edits"}


def record_kind(record: Any) -> str:
    """The kind of data (one of KINDS) a canonical record holds."""
    try:
        return _KIND_OF[type(record)]
    except KeyError:
        raise ConfigError(f"a {type(record).__name__} is not a canonical record (Fact, QAItem, Document or EditRecord)") from None


def canonical_dict(kind: str, record: Any) -> dict[str, Any]:
    """The canonical JSON object of one record of `kind`."""
    if kind == "facts":
        return record.to_dict()
    if kind == "qa":
        return {"id": record.id, "question": record.question, "answers": list(record.answers)}
    if kind == "documents":
        return {"id": record.id, "text": record.text}
    if kind == "edits":
        return record.to_dict()
    raise ConfigError(f"unknown kind of data {kind!r}; choose one of {', '.join(KINDS)}")


def write_canonical(path: str | os.PathLike, kind: str, records: Sequence[Any]) -> None:
    """Write `records` of `kind` as canonical JSONL at `path`, atomically (all or nothing), strict JSON."""
    if kind == "facts":
        write_facts(path, records)
        return
    lines = [json_text(canonical_dict(kind, r), indent=None) + "\n" for r in records]  # a bad kind fails before writing
    with atomic_open(path) as f:
        f.writelines(lines)

