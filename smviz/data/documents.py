"""Documents to record: `Document` (an id and its text, defined in `smviz.data.schema`) and
`read_documents`, the reader of the JSONL files `smviz record` takes — plain texts, or a facts file whose facts become their statements and
their questions as Q/A text (document ids by `smviz.data.facts.fact_doc_id`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from smviz.data.facts import QUESTION, STATEMENT, fact_doc_id, qa_text, read_facts
from smviz.data.formats.registry import read_text
from smviz.data.schema import Document
from smviz.errors import InputError


def read_documents(path: str | os.PathLike) -> tuple[list[Document], dict[str, Any]]:
    """Documents from a JSONL file, and a description of the source (path name, kind, sha256).

    - texts: one JSON object per line with a string "text" and an optional "id" (default: the
      document's number); ids must be unique.
    - facts (any facts format `smviz.data.facts.read_facts` reads, recognised by a "statements"
      field): each fact gives its statements (ids 'FACT:s0', ...) and its questions written as Q/A
      text ('FACT:q0', ...)."""
    path = Path(path)
    raw, text = read_text(path)
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise InputError(f"{path} holds no documents (it is empty)")
    source = {"name": path.name, "sha256": hashlib.sha256(raw).hexdigest()}
    first = _parse_line(path, *lines[0])
    if "statements" in first:
        return fact_documents(path), source | {"kind": "facts"}
    docs: list[Document] = []
    seen: set[str] = set()
    for number, line in lines:
        obj = _parse_line(path, number, line)
        if not isinstance(obj.get("text"), str):
            raise InputError(f"{path}:{number}: each line needs a string field 'text' (or be a fact with 'statements')")
        doc_id = obj.get("id", str(len(docs)))
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise InputError(f"{path}:{number}: 'id' must be a string or an integer")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise InputError(f"{path}:{number}: id {doc_id!r} appears twice; ids must be unique")
        seen.add(doc_id)
        docs.append(Document(doc_id, obj["text"]))
    return docs, source | {"kind": "texts"}


def fact_documents(path: str | os.PathLike) -> list[Document]:
    """The documents of a facts file: each fact's statements, then its questions as Q/A text."""
    docs = []
    for fact in read_facts(path):
        docs += [Document(fact_doc_id(fact.id, STATEMENT, i), s) for i, s in enumerate(fact.statements)]
        docs += [Document(fact_doc_id(fact.id, QUESTION, j), qa_text(q.text, fact.answer).rstrip("\n"))
                 for j, q in enumerate(fact.questions)]
    return docs


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{number}: expected a JSON object")
    return obj
