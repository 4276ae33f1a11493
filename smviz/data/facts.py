"""The `Fact` schema, its JSONL file format, and the one question/answer text format that training
text and evaluation share.

A fact is one (subject, relation, answer) triple with the texts that express it: statement
paraphrases (what a model is trained on), questions (each marked with its template and whether that
template is held out — held-out templates never appear in any training text and are what evaluation
asks), and the entities the texts mention (for NER alignment later).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smviz.errors import SmvizError
from smviz.io import atomic_open, json_text

QA_PROMPT = "Question: {question}\nAnswer:"
"""How a question is put to the model; the answer follows after one space and ends at the newline."""


def qa_prompt(question: str) -> str:
    return QA_PROMPT.format(question=question)


def qa_text(question: str, answer: str) -> str:
    """A question with its answer, exactly as it appears in training text."""
    return f"{qa_prompt(question)} {answer}\n"


class FactError(SmvizError, ValueError):
    """A fact is malformed."""


class FactFileError(FactError):
    """A facts file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Entity:
    text: str
    label: str  # spaCy-style label: PERSON, GPE, ORG, DATE, NORP, ...


@dataclass(frozen=True)
class Question:
    text: str
    template: str  # template id, e.g. "birthplace/q3"
    heldout: bool  # True: this template never appears in training text; evaluation asks it


@dataclass(frozen=True)
class Fact:
    id: str
    subject: str
    relation: str
    answer: str
    statements: tuple[str, ...]
    questions: tuple[Question, ...]
    entities: tuple[Entity, ...] = field(default=())

    def __post_init__(self) -> None:
        problems = []
        for name in ("id", "subject", "relation", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{name} must be a non-empty string")
        if not self.statements or not all(isinstance(s, str) and s.strip() for s in self.statements):
            problems.append("statements must be a non-empty list of non-empty strings")
        if not self.questions:
            problems.append("questions must not be empty")
        if problems:
            raise FactError("; ".join(problems))

    @property
    def training_questions(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if not q.heldout)

    @property
    def heldout_questions(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if q.heldout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fact:
        if not isinstance(d, dict):
            raise FactError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("id", "subject", "relation", "answer", "statements", "questions") if k not in d]
        if missing:
            raise FactError(f"missing fields {missing}")
        for name in ("statements", "questions"):
            if not isinstance(d[name], list):
                raise FactError(f"{name} must be a list, got {type(d[name]).__name__}")
        entities_in = d.get("entities", [])
        if not isinstance(entities_in, list):
            raise FactError("entities must be a list")
        try:
            questions = tuple(Question(q["text"], q["template"], q["heldout"]) for q in d["questions"])
            entities = tuple(Entity(e["text"], e["label"]) for e in entities_in)
        except (KeyError, TypeError) as e:
            raise FactError(f"malformed question or entity ({e!r})") from None
        for q in questions:
            if not (isinstance(q.text, str) and isinstance(q.template, str) and isinstance(q.heldout, bool)):
                raise FactError(f"question {q} needs string text and template and a boolean heldout")
        for e in entities:
            if not (isinstance(e.text, str) and isinstance(e.label, str)):
                raise FactError(f"entity {e} needs string text and label")
        return cls(d["id"], d["subject"], d["relation"], d["answer"], tuple(d["statements"]), questions, entities)


def write_facts(path: str | os.PathLike, facts: Iterable[Fact]) -> None:
    """Write facts as JSONL atomically (temp file renamed into place)."""
    with atomic_open(path) as f:
        for fact in facts:
            f.write(json_text(fact.to_dict(), indent=None) + "\n")


def read_facts(path: str | os.PathLike) -> list[Fact]:
    """Read and validate a facts JSONL file; a bad line raises FactFileError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FactFileError(f"facts file {path} does not exist")
    facts, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FactFileError(f"facts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fact = Fact.from_dict(json.loads(line))
        except (json.JSONDecodeError, FactError) as e:
            raise FactFileError(f"{path}, line {number}: {e}") from None
        if fact.id in seen:
            raise FactFileError(f"{path}, line {number}: duplicate fact id {fact.id!r}")
        seen.add(fact.id)
        facts.append(fact)
    return facts
