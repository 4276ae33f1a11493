"""The `Fact` schema, its JSONL file format, and the one question/answer text format that training
text and evaluation share.

A fact is one (subject, relation, answer) triple with the texts that express it: statement
paraphrases (what a model is trained on), questions (each marked with its template and whether that
template is held out — held-out templates never appear in any training text and are what evaluation
asks), and the entities the texts mention (for NER alignment later).

A trace of a facts file names its documents by `fact_doc_id`: 'FACT:sI' is statement I of fact FACT,
'FACT:qJ' its question J as Q/A text; `parse_fact_doc_id` reads such an id back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from smviz.errors import ConfigError, InputError
from smviz.io import atomic_open, json_text

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


QUESTION_SHAPE = "questions must be objects {text, template, heldout}"
ENTITY_SHAPE = "entities must be objects {text, label}"


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
        elif not all(isinstance(q, Question) for q in self.questions):
            problems.append("questions must be Question objects")
        if not all(isinstance(e, Entity) for e in self.entities):
            problems.append("entities must be Entity objects")
        if problems:
            raise InputError("; ".join(problems))

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
        """A fact from its JSON object, every field's type checked (InputError saying what is expected)."""
        if not isinstance(d, dict):
            raise InputError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("id", "subject", "relation", "answer", "statements", "questions") if k not in d]
        if missing:
            raise InputError(f"missing fields {missing}")
        for name in ("statements", "questions"):
            if not isinstance(d[name], list):
                raise InputError(f"{name} must be a list, got {type(d[name]).__name__}")
        entities_in = d.get("entities", [])
        if not isinstance(entities_in, list):
            raise InputError(f"entities must be a list, got {type(entities_in).__name__}")
        questions = tuple(_question(q, i) for i, q in enumerate(d["questions"]))
        entities = tuple(_entity(e, i) for i, e in enumerate(entities_in))
        return cls(d["id"], d["subject"], d["relation"], d["answer"], tuple(d["statements"]), questions, entities)


def _question(q: Any, i: int) -> Question:
    if not isinstance(q, dict):
        raise InputError(f"{QUESTION_SHAPE}; question {i} is a {_kind(q)}")
    absent = [k for k in ("text", "template", "heldout") if k not in q]
    if absent:
        raise InputError(f"malformed question {i}: it lacks {absent} ({QUESTION_SHAPE})")
    if not (isinstance(q["text"], str) and isinstance(q["template"], str) and isinstance(q["heldout"], bool)):
        raise InputError(f"question {i} needs string text and template and a boolean heldout, "
                         f"got {q['text']!r}, {q['template']!r}, {q['heldout']!r}")
    return Question(q["text"], q["template"], q["heldout"])


def _entity(e: Any, i: int) -> Entity:
    if not isinstance(e, dict):
        raise InputError(f"{ENTITY_SHAPE}; entity {i} is a {_kind(e)}")
    if not (isinstance(e.get("text"), str) and isinstance(e.get("label"), str)):
        raise InputError(f"entity {i} needs string text and label, got {e.get('text')!r}, {e.get('label')!r}")
    return Entity(e["text"], e["label"])


def _kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "list", type(None): "null"}.get(
        type(value), type(value).__name__)


def write_facts(path: str | os.PathLike, facts: Iterable[Fact]) -> None:
    """Write facts as JSONL atomically (temp file renamed into place)."""
    with atomic_open(path) as f:
        for fact in facts:
            f.write(json_text(fact.to_dict(), indent=None) + "\n")


def read_facts(path: str | os.PathLike) -> list[Fact]:
    """Read and validate a facts JSONL file; a bad line raises InputError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"facts file {path} does not exist")
    facts, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"facts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read facts file {path}: {e.strerror or e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fact = Fact.from_dict(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        except InputError as e:
            raise InputError(f"{path}, line {number}: {e}") from None
        if fact.id in seen:
            raise InputError(f"{path}, line {number}: duplicate fact id {fact.id!r}")
        seen.add(fact.id)
        facts.append(fact)
    return facts
