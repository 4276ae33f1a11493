"""The `simple` facts format: facts written the natural way, JSONL, one object per line —
`{id, subject, relation, answer, statements: [...], questions: ["Where was X born?", ...],
heldout_questions: [...] (optional), entities: [...] (optional)}`. Recognised by a first record with
"statements" and "questions" whose first question is a string.

Held-out questions (never in training text; what evaluation asks):
- with `heldout_questions`, those (a non-empty list, none of them also in `questions`); every one of
  `questions` is trained on;
- without it, the split rule `heldout_count`: the last third of `questions`, rounded up — at least
  one. 1, 2 or 3 questions hold out the last one, 4-6 the last two, 7 the last three, and so on. A fact
  with a single question holds it out, so Q/A training text gets nothing from that fact (it trains on
  its statements only). The rule depends on the question list alone: the same file always splits the
  same way.
Questions become `Question(text, template=f"q{i}", heldout)`, i counting training questions first.
`entities` items are objects `{text, label}` or plain strings (label "" until one is given)."""

from __future__ import annotations

import math
from typing import Any

from smviz.data.formats.registry import DataFormat, Records, first_object
from smviz.data.formats.smviz_facts import read_fact_records
from smviz.data.schema import Entity, Fact, Question, json_kind
from smviz.errors import InputError

REQUIRED = ("id", "subject", "relation", "answer", "statements", "questions")


def heldout_count(n_questions: int) -> int:
    """How many of a fact's last questions are held out when the file does not say: ceil(n / 3), >= 1."""
    if n_questions < 1:
        raise InputError("a fact needs at least one question")
    return max(1, math.ceil(n_questions / 3))


def _texts(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{name} must be a non-empty list of strings, got {json_kind(value)} {value!r}"[:200])
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{name} must be non-empty strings; item {i} is {json_kind(text)} {text!r}"[:200])
    return value


def _entity(e: Any, i: int) -> Entity:
    if isinstance(e, str) and e.strip():
        return Entity(e, "")
    if isinstance(e, dict) and isinstance(e.get("text"), str) and isinstance(e.get("label", ""), str):
        return Entity(e["text"], e.get("label", ""))
    raise InputError(f"entities must be strings or objects {{text, label}}; entity {i} is {json_kind(e)} {e!r}"[:200])


def to_fact(d: Any) -> Fact:
    """The `Fact` of one `simple` record (InputError saying what is expected)."""
    if not isinstance(d, dict):
        raise InputError(f"expected a JSON object, got {json_kind(d)}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise InputError(f"missing fields {missing}")
    if not isinstance(d["statements"], list):
        raise InputError(f"statements must be a list, got {json_kind(d['statements'])}")
    questions = _texts(d["questions"], "questions")
    if "heldout_questions" in d:
        heldout = _texts(d["heldout_questions"], "heldout_questions")
        both = sorted(set(questions) & set(heldout))
        if both:
            raise InputError(f"held-out question {both[0]!r} is also in questions; a held-out question is never trained on")
        trained = questions
    else:
        k = heldout_count(len(questions))
        trained, heldout = questions[:-k], questions[-k:]
    qs = [Question(t, f"q{i}", False) for i, t in enumerate(trained)]
    qs += [Question(t, f"q{len(trained) + i}", True) for i, t in enumerate(heldout)]
    entities = d.get("entities", [])
    if not isinstance(entities, list):
        raise InputError(f"entities must be a list, got {json_kind(entities)}")
    return Fact(d["id"], d["subject"], d["relation"], d["answer"], tuple(d["statements"]), tuple(qs),
                tuple(_entity(e, i) for i, e in enumerate(entities)))


def sniff(records: Records) -> bool:
    first = first_object(records)
    if first is None or "statements" not in first:
        return False
    questions = first.get("questions")
    return isinstance(questions, list) and bool(questions) and isinstance(questions[0], str)


def read(records: Records) -> list[Fact]:
    return read_fact_records(records, to_fact, "simple")


FORMAT = DataFormat(
    name="simple", kind="facts",
    help="facts with plain-string questions; optional heldout_questions (else the last third is held out)",
    sniff=sniff, read=read)
