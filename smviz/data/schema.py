"""The canonical records every data format converts to: `Fact` (with its `Question`s and `Entity`s,
smviz's own schema; `Fact.from_dict` validates its JSON object) and `Document` (an id and a text).
They live here, below the format registry, so that the readers (`smviz.data.formats`) and the file
functions (`smviz.data.facts`, `smviz.data.documents`) can all use them without importing each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from smviz.errors import InputError

QUESTION_SHAPE = "questions must be objects {text, template, heldout}"
ENTITY_SHAPE = "entities must be objects {text, label}"


@dataclass(frozen=True)
class Entity:
    text: str
    label: str  # spaCy-style label: PERSON, GPE, ORG, DATE, NORP, ...; "" when not given (`simple` facts)


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
        raise InputError(f"{QUESTION_SHAPE}; question {i} is a {json_kind(q)}")
    absent = [k for k in ("text", "template", "heldout") if k not in q]
    if absent:
        raise InputError(f"malformed question {i}: it lacks {absent} ({QUESTION_SHAPE})")
    if not (isinstance(q["text"], str) and isinstance(q["template"], str) and isinstance(q["heldout"], bool)):
        raise InputError(f"question {i} needs string text and template and a boolean heldout, "
                         f"got {q['text']!r}, {q['template']!r}, {q['heldout']!r}")
    return Question(q["text"], q["template"], q["heldout"])


def _entity(e: Any, i: int) -> Entity:
    if not isinstance(e, dict):
        raise InputError(f"{ENTITY_SHAPE}; entity {i} is a {json_kind(e)}")
    if not (isinstance(e.get("text"), str) and isinstance(e.get("label"), str)):
        raise InputError(f"entity {i} needs string text and label, got {e.get('text')!r}, {e.get('label')!r}")
    return Entity(e["text"], e["label"])


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "list", type(None): "null"}.get(
        type(value), type(value).__name__)



@dataclass(frozen=True)
class Document:
    id: str
    text: str
