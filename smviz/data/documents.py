"""Documents to record: `Document` (an id and its text, defined in `smviz.data.schema`) and
`read_documents`, the reader of the JSONL files `smviz record` takes — plain texts, or a facts file whose facts become their statements and
their questions as Q/A text (document ids by `smviz.data.facts.fact_doc_id`) — and how a recording cuts
them: into windows of the model's context (`chunk_spans`) and into shards of about a number of tokens
(`plan_shards`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from smviz.data.facts import QUESTION, STATEMENT, fact_doc_id, qa_text, read_facts
from smviz.data.formats.registry import read_text
from smviz.data.schema import Document
from smviz.errors import ConfigError, InputError


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


def chunk_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, first) over a document of n_tokens: the model reads tokens start..end-1
    and tokens first..end-1 are recorded from this window. Consecutive windows start `stride` apart;
    every token is recorded exactly once."""
    if not 1 <= stride <= context:
        raise ConfigError(f"stride must lie in [1, context={context}], got {stride}")
    spans, start, done = [], 0, 0
    while done < n_tokens:
        end = min(start + context, n_tokens)
        spans.append((start, end, done))
        done = end
        start += stride
    return spans


def plan_shards(tokenizer: Any, documents: Sequence[Document], shard_tokens: int) -> list[tuple[int, int, int]]:
    """The recording's shards as (first document, end document, first token row): documents in order,
    each shard about `shard_tokens` tokens (at least one document). Every process of a distributed
    recording computes the same plan, so shards, rows and files do not depend on the process count."""
    plan, first, total, row, lengths = [], 0, 0, 0, []
    for start in range(0, len(documents), 1024):  # token counts only, in chunks: bounded memory
        texts = [d.text for d in documents[start : start + 1024]]
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(lengths):
        total += n
        if total >= shard_tokens or i == len(lengths) - 1:
            plan.append((first, i + 1, row))
            first, row, total = i + 1, row + total, 0
    return plan
