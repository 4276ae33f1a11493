"""Fact schema and JSONL I/O: round trip, every malformed line refused with its line number, and the
doc-id convention of a fact's documents in a trace."""

from __future__ import annotations

import hashlib
import json

import pytest

from smviz.data.facts import (
    Entity,
    Fact,
    FactDocId,
    Question,
    fact_doc_id,
    parse_fact_doc_id,
    qa_prompt,
    qa_text,
    read_facts,
    write_facts,
)
from smviz.errors import ConfigError, InputError


def make_fact(i: int = 0) -> Fact:
    return Fact(
        id=f"p{i}/birthplace",
        subject="Ada Vasseur",
        relation="birthplace",
        answer="Lima",
        statements=("Ada Vasseur was born in Lima.", "Lima is the birthplace of Ada Vasseur."),
        questions=(Question("Where was Ada Vasseur born?", "birthplace/q0", False),
                   Question("In which city was Ada Vasseur born?", "birthplace/q4", True)),
        entities=(Entity("Ada Vasseur", "PERSON"), Entity("Lima", "GPE")),
    )


def test_round_trip(tmp_path):
    facts = [make_fact(0), make_fact(1)]
    write_facts(tmp_path / "f.jsonl", facts)
    assert read_facts(tmp_path / "f.jsonl") == facts
    assert [q.template for q in facts[0].heldout_questions] == ["birthplace/q4"]
    assert [q.template for q in facts[0].training_questions] == ["birthplace/q0"]


def test_qa_format():
    assert qa_prompt("Where?") == "Question: Where?\nAnswer:"
    assert qa_text("Where?", "Lima") == "Question: Where?\nAnswer: Lima\n"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("answer"), "missing fields"),
        (lambda d: d.update(statements=5), "statements must be a list"),
        (lambda d: d.update(statements="abc"), "statements must be a list"),
        (lambda d: d.update(statements=[]), "statements must be a non-empty"),
        (lambda d: d["questions"][0].update(heldout="false"), "boolean heldout"),
        (lambda d: d["questions"][0].update(text=None), "string text"),
        (lambda d: d["questions"][0].pop("template"), "malformed question"),
        (lambda d: d["entities"][0].update(label=3), "string text and label"),
        (lambda d: d.update(subject=" "), "subject must be a non-empty string"),
        (lambda d: d.update(questions=["Where was Ada born?"]), r"questions must be objects \{text, template, heldout\}"),
        (lambda d: d.update(questions=[]), "questions must not be empty"),
        (lambda d: d.update(entities=["Ada"]), r"entities must be objects \{text, label\}"),
        (lambda d: d.update(entities={"text": "Ada"}), "entities must be a list"),
        (lambda d: d.update(id=7), "id must be a non-empty string"),
        (lambda d: d.update(answer=None), "answer must be a non-empty string"),
        (lambda d: d.update(statements=["ok", 3]), "statements must be a non-empty list of non-empty strings"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, mutate, message):
    good = make_fact(0).to_dict()
    bad = make_fact(1).to_dict()
    mutate(bad)
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    before = path.read_bytes()
    with pytest.raises(InputError, match=rf"f\.jsonl, line 3: .*{message}") as err:
        read_facts(path)
    assert "\n" not in str(err.value) and "Error(" not in str(err.value)  # one line, no exception repr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


def test_questions_as_plain_strings_get_the_expected_shape(tmp_path):
    """A file is in one format, told by its first record: in an `smviz` facts file a line with
    plain-string questions gets the message the issue asks for, exactly (file, line, what a question
    must be); the same line first in its file is a `simple` fact and reads (tests/test_formats.py)."""
    good = make_fact(0).to_dict()
    bad = make_fact(1).to_dict() | {"questions": ["Where was Ada Vasseur born?"]}
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": "p9/x"}) + "\n" + json.dumps(bad) + "\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError) as err:
        read_facts(path)
    assert str(err.value) == f"{path}, line 3: questions must be objects {{text, template, heldout}}; question 0 is a string"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    path.write_text(json.dumps(bad) + "\n")
    assert [(q.text, q.heldout) for q in read_facts(path)[0].questions] == [("Where was Ada Vasseur born?", True)]


def test_not_json_and_duplicates(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        read_facts(path)
    fact = json.dumps(make_fact(0).to_dict())
    path.write_text(fact + "\n" + fact + "\n")
    with pytest.raises(InputError, match="line 2: duplicate fact id"):
        read_facts(path)
    with pytest.raises(InputError, match="does not exist"):
        read_facts(tmp_path / "missing.jsonl")


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "f.jsonl"
    write_facts(path, [make_fact(0)])
    before = path.read_bytes()

    def broken():
        yield make_fact(1)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_facts(path, broken())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


def test_fact_doc_ids_round_trip():
    assert fact_doc_id("p0001/birthplace", "s", 3) == "p0001/birthplace:s3"
    assert fact_doc_id("F1", "q", 0) == "F1:q0"
    assert parse_fact_doc_id("p0001/birthplace:s3") == FactDocId("p0001/birthplace", "s", 3)
    assert parse_fact_doc_id("a:b:q12") == ("a:b", "q", 12)  # the last colon separates
    for other in ("F1", "F1:", ":s0", "F1:x0", "F1:s", "F1:s-1", "F1:sq", "0:3"):
        assert parse_fact_doc_id(other) is None, other
    with pytest.raises(ConfigError, match="kind"):
        fact_doc_id("F1", "x", 0)
