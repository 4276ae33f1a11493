"""The data-format registry and the built-in `smviz`, `simple`, `qa` and `documents` formats: detection
by content, the `simple` held-out split rule by hand, a `simple` facts file training and evaluating
through `smviz finetune` with no conversion step, and every bad input refused in one line naming the
file and the line, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smviz.cli import main
from smviz.data.facts import Entity, Fact, Question, read_facts, write_facts
from smviz.data.formats import detect, format_names, get_format, load_records, read_data
from smviz.data.formats.qa import QAItem
from smviz.data.formats.simple import heldout_count
from smviz.data.schema import Document
from smviz.errors import ConfigError, InputError


def simple_record(i: int, n_questions: int = 3, **extra) -> dict:
    return {"id": f"f{i}", "subject": f"Ada {i}", "relation": "birthplace", "answer": "Lima",
            "statements": [f"Ada {i} was born in Lima."],
            "questions": [f"Question {j} about Ada {i}?" for j in range(n_questions)]} | extra


def write_lines(path: Path, objects: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- registry and detection


def test_builtin_formats_in_detection_order():
    assert format_names() == ("smviz", "simple", "counterfact", "zsre", "edits", "qa", "documents")
    assert [get_format(n).kind for n in format_names()] == ["facts", "facts", "edits", "edits", "edits", "qa", "documents"]
    with pytest.raises(ConfigError, match=r"unknown data format 'csv'; choose one of smviz, simple, "):
        get_format("csv")
    with pytest.raises(ConfigError, match="unknown data format 'csv'"):
        read_data(Path(__file__), format="csv")


def test_detection_by_content(tmp_path):
    smviz_fact = Fact("f0", "Ada", "birthplace", "Lima", ("Ada was born in Lima.",),
                      (Question("Where was Ada born?", "birthplace/q0", True),))
    write_facts(tmp_path / "a.txt", [smviz_fact])
    write_lines(tmp_path / "b.data", [simple_record(0)])
    write_lines(tmp_path / "c.jsonl", [{"question": "Where?", "answer": "Lima"}])
    write_lines(tmp_path / "d.jsonl", [{"id": "x", "text": "Ada was born in Lima."}])
    names = [detect(load_records(tmp_path / f)).name for f in ("a.txt", "b.data", "c.jsonl", "d.jsonl")]
    assert names == ["smviz", "simple", "qa", "documents"]
    assert read_data(tmp_path / "a.txt")[1] == [smviz_fact]
    assert read_data(tmp_path / "d.jsonl") == (get_format("documents"), [Document("x", "Ada was born in Lima.")])
    # a facts file named as documents is read as what it is told
    with pytest.raises(InputError, match=r"b\.data, line 1: 'text' must be a string"):
        read_data(tmp_path / "b.data", format="documents")
    write_lines(tmp_path / "e.jsonl", [{"title": "no known shape"}])
    with pytest.raises(InputError, match=r"e\.jsonl, line 1: cannot tell the data format .*--format"):
        read_data(tmp_path / "e.jsonl")


# --------------------------------------------------------------------------- simple facts


@pytest.mark.parametrize("n, trained, heldout", [
    (1, [], [0]), (2, [0], [1]), (3, [0, 1], [2]), (4, [0, 1], [2, 3]), (5, [0, 1, 2], [3, 4]),
    (6, [0, 1, 2, 3], [4, 5]), (7, [0, 1, 2, 3], [4, 5, 6]),
])
def test_simple_split_rule_by_hand(tmp_path, n, trained, heldout):
    assert heldout_count(n) == len(heldout)
    path = write_lines(tmp_path / "f.jsonl", [simple_record(0, n)])
    (fact,) = read_facts(path)
    texts = simple_record(0, n)["questions"]
    assert [q.text for q in fact.training_questions] == [texts[i] for i in trained]
    assert [q.text for q in fact.heldout_questions] == [texts[i] for i in heldout]
    assert [q.template for q in fact.questions] == [f"q{i}" for i in range(n)]
    assert read_facts(path) == [fact]  # the same file splits the same way, every time


def test_simple_explicit_heldout_and_entities(tmp_path):
    record = simple_record(0, 2, heldout_questions=["Where is Ada from?"],
                           entities=["Ada 0", {"text": "Lima", "label": "GPE"}])
    (fact,) = read_facts(write_lines(tmp_path / "f.jsonl", [record]))
    assert fact == Fact("f0", "Ada 0", "birthplace", "Lima", ("Ada 0 was born in Lima.",),
                        (Question("Question 0 about Ada 0?", "q0", False), Question("Question 1 about Ada 0?", "q1", False),
                         Question("Where is Ada from?", "q2", True)),
                        (Entity("Ada 0", ""), Entity("Lima", "GPE")))


@pytest.mark.parametrize("change, message", [
    ({"questions": ["Where?", 3]}, "questions must be non-empty strings; item 1 is number 3"),
    ({"heldout_questions": []}, "heldout_questions must be a non-empty list"),
    ({"heldout_questions": ["Question 0 about Ada 1?"]}, "is also in questions"),
    ({"entities": [5]}, r"entities must be strings or objects \{text, label\}"),
    ({"answer": ""}, "answer must be a non-empty string"),
    ({"id": "f0"}, "duplicate fact id 'f0'"),
])
def test_simple_bad_record_names_file_and_line(tmp_path, change, message):
    path = write_lines(tmp_path / "f.jsonl", [simple_record(0), simple_record(1) | change])
    before = listing(tmp_path)
    with pytest.raises(InputError, match=rf"^{tmp_path}/f\.jsonl, line 2: .*{message}") as err:
        read_facts(path)
    assert "\n" not in str(err.value) and listing(tmp_path) == before


# --------------------------------------------------------------------------- qa and documents


def test_qa_records(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [{"question": "Where was Ada born?", "answer": "Lima"},
                                              {"id": "k2", "question": "Capital of Peru?", "answers": ["Lima", "Lima, Peru"]}])
    fmt, items = read_data(path)
    assert fmt.name == "qa" and items == [QAItem("line1", "Where was Ada born?", ("Lima",)),
                                          QAItem("k2", "Capital of Peru?", ("Lima", "Lima, Peru"))]


def test_documents_records(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "One."}, {"id": 7, "text": "Two."}])
    assert read_data(path)[1] == [Document("0", "One."), Document("7", "Two.")]


# --------------------------------------------------------------------------- bad input


def bad_cases(tmp_path: Path) -> list[tuple[Path, str | None, str]]:
    fact = simple_record(0)
    cases = []

    def case(name: str, content: bytes, fmt: str | None, message: str) -> None:
        (tmp_path / name).write_bytes(content)
        cases.append((tmp_path / name, fmt, message))

    case("spread.jsonl", json.dumps(fact, indent=2).encode(), None,
         r"spread\.jsonl, line 1: not valid JSON .*JSONL: one object per line")
    case("list.json", json.dumps([fact, simple_record(1)]).encode(), None,
         r"list\.json, line 1: a JSON list, but 'simple' files are JSONL")
    case("list2.json", json.dumps([fact]).encode(), "simple", r"list2\.json, line 1: a JSON list, but 'simple'")
    case("empty-answers.jsonl", b'{"question": "a?", "answer": "b"}\n{"question": "Where?", "answers": []}\n', None,
         r"empty-answers\.jsonl, line 2: answers is empty")
    case("no-question.jsonl", b'{"question": "a?", "answer": "b"}\n{"answer": "b"}\n', "qa",
         r"no-question\.jsonl, line 2: 'question' must be a non-empty string")
    case("dup-qa.jsonl", b'{"id": "a", "question": "a?", "answer": "b"}\n\n{"id": "a", "question": "c?", "answer": "d"}\n',
         None, r"dup-qa\.jsonl, line 3: duplicate id 'a'")
    case("dup-docs.jsonl", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', None,
         r"dup-docs\.jsonl, line 2: duplicate id 'a'")
    case("latin1.jsonl", b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n', None,
         r"latin1\.jsonl, line 2: the file is not UTF-8 text \(byte 0xe9\)")
    case("huge.jsonl", b'{"id": "a", "text": "x"}\n' + json.dumps({"text": "word " * 1_000_000}).encode() + b"\n", None,
         r"huge\.jsonl, line 2: 5,000,012 characters, more than 1,000,000 on one line")
    case("empty-text.jsonl", b'{"id": "a", "text": "x"}\n{"id": "b", "text": "  "}\n', None,
         r"empty-text\.jsonl, line 2: the text is empty")
    return cases


def test_bad_input_is_one_line_naming_file_and_line_and_writes_nothing(tmp_path):
    cases = bad_cases(tmp_path)
    before = listing(tmp_path)
    for path, fmt, message in cases:
        with pytest.raises(InputError, match=rf"^{tmp_path}/{message}") as err:
            read_data(path, format=fmt)
        assert "\n" not in str(err.value) and "Error(" not in str(err.value), path
    for name in ("spread.jsonl", "list.json", "latin1.jsonl"):  # the facts reader says the same
        with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')}, line"):
            read_facts(tmp_path / name)
    with pytest.raises(ConfigError, match="holds qa, not facts"):
        read_facts(tmp_path / "dup-qa.jsonl", format="qa")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- end to end


def simple_form(fact: Fact) -> dict:
    """A fact written the natural way: plain-string questions, its held-out ones by the split rule."""
    return {"id": fact.id, "subject": fact.subject, "relation": fact.relation, "answer": fact.answer,
            "statements": list(fact.statements), "questions": [q.text for q in fact.questions],
            "entities": [e.text for e in fact.entities]}


def test_simple_facts_file_trains_and_evaluates_with_no_conversion(tmp_path, capsys):
    """Done 1 of issue 15: `smviz finetune --facts SIMPLE --known SIMPLE` on the micro preset."""
    from smviz.data.tokenizer import train_tokenizer
    from smviz.data.world import WorldConfig
    from smviz.model import MemoryModel
    from smviz.workspace import Workspace
    from smviz.workspace.stages import build_data, load_data

    ws = Workspace(tmp_path / "ws")
    build_data(ws.data, WorldConfig(n_known=2, n_bio_only=1, n_new=1))
    data = load_data(ws.data)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=300)
    model.tokenizer = train_tokenizer([a.text for a in data.corpus_train[:20]] + data.training_world_texts(copies=1, seed=0),
                                      vocab_size=300)
    model.save_pretrained(ws.model("m"))
    new = write_lines(tmp_path / "new.jsonl", [simple_form(f) for f in data.world.new[:2]])
    known = write_lines(tmp_path / "known.jsonl", [simple_form(f) for f in data.world.known[:2]])
    assert [f.questions[-1].heldout for f in read_facts(new)] == [True, True]
    out = tmp_path / "run"
    args = ["finetune", "--model", str(ws.model("m")), "--out", str(out), "--workspace", str(ws.root),
            "--facts", str(new), "--known", str(known), "--method", "full", "--known-facts", "2", "--heldout-rows", "1",
            "--max-facts", "2", "--batch-size", "2", "--steps-per-fact", "1", "--eval-every", "1", "--device", "cpu", "--json"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "full" and summary["steps"] == 2 and summary["facts"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all("known_em" in m and "learn_em" in m for m in metrics), metrics[0].keys()
    identity = json.loads((out / "config.json").read_text())
    assert identity["stream"]["ids"] == [f.id for f in data.world.new[:2]] and identity["stream"]["kind"] == "facts"


def test_a_facts_file_expected_but_another_kind_given_names_what_it_holds(tmp_path):
    qa = write_lines(tmp_path / "qa.jsonl", [{"question": "Where was Ada born?", "answer": "London"}])
    with pytest.raises(InputError) as e:
        read_facts(qa)
    assert str(e.value) == f"{qa} holds Q/A items (format qa), not facts; a facts file is expected here (formats smviz or simple)"
    docs = write_lines(tmp_path / "docs.jsonl", [{"id": "d", "text": "Ada was born in London."}])
    with pytest.raises(InputError, match=r"docs.jsonl holds documents \(format documents\), not facts"):
        read_facts(docs)
