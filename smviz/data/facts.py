"""Facts files, and the one question/answer text format that training text and evaluation share.

A fact (`Fact`, defined with `Question` and `Entity` in `smviz.data.schema` and importable from here)
is one (subject, relation, answer) triple with the texts that express it: statement paraphrases (what
a model is trained on), questions (each marked with its template and whether it is held out — held-out
questions never appear in any training text and are what evaluation asks), and the entities the texts
mention (for NER alignment later).

`read_facts` reads a facts file in any facts format of `smviz.data.formats`, detected by content
(`smviz`, smviz's own schema, or `simple`, plain-string questions); `write_facts` writes the `smviz`
form.

A trace of a facts file names its documents by `fact_doc_id`: 'FACT:sI' is statement I of fact FACT,
'FACT:qJ' its question J as Q/A text; `parse_fact_doc_id` reads such an id back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from smviz.data.formats import KIND_NOUNS, data_formats, detect_kind, get_format, load_records
from smviz.data.schema import ENTITY_SHAPE, QUESTION_SHAPE, Entity, Fact, Question
from smviz.errors import ConfigError, InputError
from smviz.io import atomic_open, json_text

__all__ = ["ENTITY_SHAPE", "QUESTION_SHAPE", "Entity", "Fact", "FactDocId", "Question", "QA_PROMPT", "QUESTION",
           "STATEMENT", "fact_doc_id", "parse_fact_doc_id", "qa_prompt", "qa_text", "read_facts", "write_facts"]

QA_PROMPT = "Question: {question}\nAnswer:"
"""How a question is put to the model; the answer follows after one space and ends at the newline."""


def qa_prompt(question: str) -> str:
    return QA_PROMPT.format(question=question)


def qa_text(question: str, answer: str) -> str:
    """A question with its answer, exactly as it appears in training text."""
    return f"{qa_prompt(question)} {answer}\n"


STATEMENT = "s"
QUESTION = "q"
"""The two kinds of a fact's documents in a trace: its statements and its questions (as Q/A text)."""


class FactDocId(NamedTuple):
    fact_id: str
    kind: str  # STATEMENT or QUESTION
    index: int  # which statement / question of the fact, from 0


def fact_doc_id(fact_id: str, kind: str, index: int) -> str:
    """The document id of statement (`kind` "s") or question ("q") number `index` of a fact: 'FACT:s0'."""
    if kind not in (STATEMENT, QUESTION):
        raise ConfigError(f"kind must be {STATEMENT!r} (statement) or {QUESTION!r} (question), got {kind!r}")
    return f"{fact_id}:{kind}{int(index)}"


def parse_fact_doc_id(doc_id: str) -> FactDocId | None:
    """(fact id, kind, index) of a document id built by `fact_doc_id`; None for any other id."""
    fact_id, sep, rest = doc_id.rpartition(":")
    if not sep or not fact_id or len(rest) < 2 or rest[0] not in (STATEMENT, QUESTION) or not rest[1:].isdigit():
        return None
    return FactDocId(fact_id, rest[0], int(rest[1:]))


def write_facts(path: str | os.PathLike, facts: Iterable[Fact]) -> None:
    """Write facts as JSONL atomically (temp file renamed into place)."""
    with atomic_open(path) as f:
        for fact in facts:
            f.write(json_text(fact.to_dict(), indent=None) + "\n")


def read_facts(path: str | os.PathLike, format: str | None = None) -> list[Fact]:
    """The facts of a facts file (JSONL), validated; its format (`smviz` or `simple`) is detected from the
    first record unless `format` names it. An empty file holds no facts ([]); a bad line raises
    InputError naming file and line."""
    records = load_records(path)
    if not records.objects:
        return []
    if format is None:
        fmt = detect_kind(records, "facts", default="smviz")
        other = next((f for f in data_formats() if f.kind != "facts" and f.sniff(records)), None)
        if other is not None and not fmt.sniff(records):
            raise InputError(f"{path} holds {KIND_NOUNS[other.kind]} (format {other.name}), not facts; a facts file is "
                             "expected here (formats smviz or simple)")
    else:
        fmt = get_format(format)
        if fmt.kind != "facts":
            raise ConfigError(f"data format {format!r} holds {fmt.kind}, not facts")
    return fmt.read(records)
