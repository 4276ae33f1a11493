"""`smviz data convert`: each kind of data file becomes smviz's canonical JSONL, read back equal to what
the format's reader gives; the detected format is printed; bad input and an unknown --format are a
one-line error and write nothing."""

from __future__ import annotations

import json

from smviz.cli import main
from smviz.data.facts import read_facts
from smviz.data.formats import load_records
from smviz.data.formats.smviz_edits import FORMAT as EDITS_FORMAT

from test_edit_formats import COUNTERFACT, EXPECTED_CF, EXPECTED_ZSRE, ZSRE, write_json, write_jsonl


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_counterfact_writes_canonical_edits(tmp_path, capsys):
    src, out = write_json(tmp_path / "counterfact.json", COUNTERFACT), tmp_path / "out" / "edits.jsonl"
    assert main(["data", "convert", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{src}: format counterfact (edits), 3 records -> {out}"
    assert EDITS_FORMAT.read(load_records(out)) == EXPECTED_CF
    assert lines(out)[0]["neighborhood"][0] == {"prompt": "The mother tongue of Léon Blum is", "answer": "French"}


def test_convert_zsre_with_named_format(tmp_path, capsys):
    src, out = write_jsonl(tmp_path / "zsre.jsonl", ZSRE), tmp_path / "zsre-canonical.jsonl"
    assert main(["data", "convert", str(src), "--out", str(out), "--format", "zsre"]) == 0
    assert "format zsre (edits), 2 records" in capsys.readouterr().out
    assert EDITS_FORMAT.read(load_records(out)) == EXPECTED_ZSRE


def test_convert_qa_documents_and_simple_facts(tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Where was Ada born?", "answer": "Paris"},
                                             {"id": "q2", "question": "Who wrote Emma?", "answers": ["Jane Austen", "Austen"]}])
    assert main(["data", "convert", str(qa), "--out", str(tmp_path / "qa-out.jsonl")]) == 0
    assert lines(tmp_path / "qa-out.jsonl") == [
        {"id": "line1", "question": "Where was Ada born?", "answers": ["Paris"]},
        {"id": "q2", "question": "Who wrote Emma?", "answers": ["Jane Austen", "Austen"]}]
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "d1", "text": "Ada was born in Paris."}, {"id": "d2", "text": "Emma."}])
    assert main(["data", "convert", str(docs), "--out", str(tmp_path / "docs-out.jsonl")]) == 0
    assert lines(tmp_path / "docs-out.jsonl") == [{"id": "d1", "text": "Ada was born in Paris."}, {"id": "d2", "text": "Emma."}]
    fact = {"id": "ada", "subject": "Ada", "relation": "birthplace", "answer": "Paris",
            "statements": ["Ada was born in Paris."], "questions": ["Where was Ada born?", "Which city is Ada's birthplace?"]}
    facts = write_jsonl(tmp_path / "facts.jsonl", [fact])
    assert main(["data", "convert", str(facts), "--out", str(tmp_path / "facts-out.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1].split(",")[0] for line in out] == ["format qa (qa)", "format documents (documents)",
                                                                       "format simple (facts)"]
    assert read_facts(tmp_path / "facts-out.jsonl") == read_facts(facts)
    assert lines(tmp_path / "facts-out.jsonl")[0]["questions"][0]["text"] == "Where was Ada born?"


def test_unknown_format_is_one_line_and_writes_nothing(tmp_path, capsys):
    src, out = write_json(tmp_path / "counterfact.json", COUNTERFACT), tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), "--out", str(out), "--format", "rome"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smviz data convert: error: unknown data format 'rome'; choose one of ")
    assert "counterfact" in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_input_is_one_line_and_leaves_the_output_unchanged(tmp_path, capsys):
    cases = json.loads(json.dumps(COUNTERFACT))
    cases[2]["requested_rewrite"]["prompt"] = "Toko Yasuda, the"
    src, out = write_json(tmp_path / "counterfact.json", cases), tmp_path / "out.jsonl"
    out.write_text("previous\n")
    assert main(["data", "convert", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"smviz data convert: error: {src}, record 2: requested_rewrite.prompt 'Toko Yasuda, the' "
                   "has no '{}' where the subject goes\n")
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["counterfact.json", "out.jsonl"]


def test_label_entities_fills_missing_labels_with_spacy_and_keeps_given_ones(tmp_path, capsys):
    """Plain-string entities get spaCy's NER label: the one it gives the text in the fact's statements
    ("Ada Lovelace" PERSON, "London" GPE there), else the text's own label when spaCy reads it whole as one
    entity ("Paris", not in any statement), else none ("blue sky"); a given label is kept."""
    fact = {"id": "ada", "subject": "Ada Lovelace", "relation": "birthplace", "answer": "London",
            "statements": ["Ada Lovelace was born in London in 1815.", "London is where Ada Lovelace was born."],
            "questions": ["Where was Ada Lovelace born?"],
            "entities": ["Ada Lovelace", "London", "Paris", "blue sky", {"text": "1815", "label": "YEAR"}]}
    src, out = write_jsonl(tmp_path / "facts.jsonl", [fact]), tmp_path / "labelled.jsonl"
    assert main(["data", "convert", str(src), "--out", str(out), "--label-entities"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "entity labels from spaCy: 2 from the statements, 1 from the entity alone, 1 left unlabelled"
    assert [(e.text, e.label) for e in read_facts(out)[0].entities] == [
        ("Ada Lovelace", "PERSON"), ("London", "GPE"), ("Paris", "GPE"), ("blue sky", ""), ("1815", "YEAR")]
    # only facts have entities to label; nothing is written
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Who?", "answer": "Ada"}])
    assert main(["data", "convert", str(qa), "--out", str(tmp_path / "qa-out.jsonl"), "--label-entities"]) == 2
    assert "--label-entities labels the entities of facts" in capsys.readouterr().err
    assert not (tmp_path / "qa-out.jsonl").exists()
