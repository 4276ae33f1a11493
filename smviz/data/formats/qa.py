"""The `qa` format: question/answer pairs, JSONL — `{"question", "answer"}` or `{"question",
"answers": [...]}` per line, with an optional "id" (default "lineN", N its line number). An
evaluation set, or a stream of Q/A training lines. Canonical record: `QAItem`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smviz.data.formats.registry import DataFormat, Records, first_object, jsonl_objects, record_id
from smviz.data.schema import json_kind
from smviz.errors import InputError

SHAPE = 'each line is {"question": ..., "answer": ...} or {"question": ..., "answers": [...]}'


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: tuple[str, ...]  # any of them counts as correct; the first is the one trained on


def _answers(obj: dict[str, Any]) -> tuple[str, ...]:
    if ("answer" in obj) == ("answers" in obj):
        raise InputError(f"give either 'answer' or 'answers' ({SHAPE})")
    answers = [obj["answer"]] if "answer" in obj else obj["answers"]
    if not isinstance(answers, list):
        raise InputError(f"answers must be a list of strings, got {json_kind(answers)}")
    if not answers:
        raise InputError("answers is empty; a question needs at least one answer")
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            raise InputError(f"answer {i} must be a non-empty string, got {json_kind(a)} {a!r}"[:200])
    return tuple(answers)


def read(records: Records) -> list[QAItem]:
    items, seen = [], set()
    for (where, obj), line in zip(jsonl_objects(records, "qa"), records.where):
        try:
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {json_kind(obj)} ({SHAPE})")
            question = obj.get("question")
            if not isinstance(question, str) or not question.strip():
                raise InputError(f"'question' must be a non-empty string, got {question!r} ({SHAPE})"[:300])
            item = QAItem(record_id(obj, f"line{line}"), question, _answers(obj))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if item.id in seen:
            raise InputError(f"{where}: duplicate id {item.id!r}; ids must be unique")
        seen.add(item.id)
        items.append(item)
    return items


def sniff(records: Records) -> bool:
    first = first_object(records)
    return first is not None and "question" in first and ("answer" in first or "answers" in first)


FORMAT = DataFormat(name="qa", kind="qa", help='question/answer pairs: {"question", "answer"} or {"question", "answers": [...]}',
                    sniff=sniff, read=read)
