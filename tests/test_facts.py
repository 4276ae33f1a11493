"""Fact schema and JSONL I/O: round trip, and every malformed line refused with its line number."""

from __future__ import annotations

import json

import pytest

from smviz.data.facts import Entity, Fact, FactFileError, Question, qa_prompt, qa_text, read_facts, write_facts


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
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, mutate, message):
    good = make_fact(0).to_dict()
    bad = make_fact(1).to_dict()
    mutate(bad)
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(FactFileError, match=rf"f\.jsonl, line 3: .*{message}"):
        read_facts(path)


def test_not_json_and_duplicates(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(FactFileError, match="line 1"):
        read_facts(path)
    fact = json.dumps(make_fact(0).to_dict())
    path.write_text(fact + "\n" + fact + "\n")
    with pytest.raises(FactFileError, match="line 2: duplicate fact id"):
        read_facts(path)
    with pytest.raises(FactFileError, match="does not exist"):
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
