"""The `smviz` facts format, smviz's own schema and the canonical form every facts format converts to:
JSONL, one `Fact` object per line — `{id, subject, relation, answer, statements: [...], questions:
[{text, template, heldout}, ...], entities: [{text, label}, ...] (optional)}`. Recognised by a first
record with "statements" and "questions" whose first question is an object.

`read_fact_records` is the loop every facts format shares: each line converted and validated, errors
prefixed with file and line, fact ids unique."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smviz.data.formats.registry import DataFormat, Records, first_object, jsonl_objects
from smviz.data.schema import Fact
from smviz.errors import InputError


def read_fact_records(records: Records, convert: Callable[[Any], Fact], format_name: str) -> list[Fact]:
    """`convert` applied to each record of a JSONL facts file; InputError "FILE, line N: ..." on the
    first bad one (a repeated fact id included)."""
    facts, seen = [], set()
    for where, obj in jsonl_objects(records, format_name):
        try:
            fact = convert(obj)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if fact.id in seen:
            raise InputError(f"{where}: duplicate fact id {fact.id!r}")
        seen.add(fact.id)
        facts.append(fact)
    return facts


def sniff(records: Records) -> bool:
    first = first_object(records)
    if first is None or "statements" not in first:
        return False
    questions = first.get("questions")
    return isinstance(questions, list) and bool(questions) and isinstance(questions[0], dict)


def read(records: Records) -> list[Fact]:
    return read_fact_records(records, Fact.from_dict, "smviz")


FORMAT = DataFormat(
    name="smviz", kind="facts",
    help="smviz's facts schema: questions as objects {text, template, heldout} (what `smviz data` writes)",
    sniff=sniff, read=read)
