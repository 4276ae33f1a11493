"""Forgetting probes built from what a model knows (smviz.evaluate.probe, `smviz data probe`): containment
scoring by hand, a base model answering through its silent memory exactly as the base does, the kept
questions against an unbatched greedy reference, the files written, bad input writing nothing, and the
project's real-knowledge set."""

from __future__ import annotations

import json

import pytest
import torch

from smviz.cli import main
from smviz.data.formats import read_data
from smviz.data.formats.qa import QAItem
from smviz.data.prompts import get_prompt_format
from smviz.errors import ConfigError
from smviz.evaluate.probe import REAL_KNOWLEDGE, answering_model, build_probe, provenance_path
from smviz.evaluate.scoring import answer_contained, qa_metrics
from smviz.model import import_model, load_base_model
from test_evaluate import greedy_ids_reference
from test_import import TEXTS, micro_llama, write_hf_dir

QUESTIONS = ["Who wrote Emma?", "What is the capital of France?", "Where did the cat sit?", "What is the dog?",
             "Who sat on the mat?", "What is Paris?"]


def test_answer_contained_by_hand():
    assert answer_contained("The capital of France is Paris.", "Paris") == 1.0
    assert answer_contained("It is New York City", "new york") == 1.0
    assert answer_contained("Parisian cafes", "Paris") == 0.0  # whole tokens only
    assert answer_contained("York, New", "New York") == 0.0  # contiguous, in order
    assert answer_contained("", "Paris") == 0.0
    assert answer_contained("The Beatles", "the beatles!") == 1.0  # SQuAD normalisation on both sides
    rows = [{"relation": "qa", "em": 0.0, "f1": 0.5, "contained": 1.0}, {"relation": "qa", "em": 0.0, "f1": 0.0, "contained": 0.0}]
    assert qa_metrics(rows)["contained"] == 0.5
    assert qa_metrics([{"relation": "qa", "em": 1.0, "f1": 1.0}])["contained"] is None  # rows that lack it


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from smviz.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("probe")
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    out = tmp / "models" / "base"
    import_model(write_hf_dir(tmp / "hf", micro_llama(tokenizer), tokenizer), out)
    return out


def test_a_base_model_answers_exactly_as_the_base_does(base_dir):
    lm, tokenizer, metadata = load_base_model(base_dir)
    model = answering_model(base_dir)
    ids = torch.tensor([tokenizer("the cat sat on the mat. Paris is the").input_ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lm(input_ids=ids).logits)
    assert model.model_hash == metadata["model_hash"]


def test_build_probe_keeps_exactly_the_questions_answered(base_dir):
    model = answering_model(base_dir)
    fmt = get_prompt_format("qa")
    reference = [greedy_ids_reference(model, model.tokenizer, fmt.encode_prompt(model.tokenizer, q)) for q in QUESTIONS]
    assert any(reference), "the micro model must answer something for the test to mean anything"
    # every other question gets its model's own answer (or its last word) among wrong ones; the rest only wrong ones
    items, expected = [], []
    for i, (q, answer) in enumerate(zip(QUESTIONS, reference)):
        words = answer.split()
        if i % 2 == 0 and words:
            items.append(QAItem(f"q{i}", q, ("zzqx wrong", words[-1])))
            expected.append(f"q{i}")
        else:
            items.append(QAItem(f"q{i}", q, ("zzqx wrong",)))
    kept, provenance = build_probe(model, items, prompt_format="qa")
    assert [item.id for item in kept] == expected
    assert provenance["asked"] == len(items) and provenance["kept"] == len(expected)
    assert provenance["model_hash"] == model.model_hash
    assert [a["prediction"] for a in provenance["answers"]] == reference


def test_data_probe_writes_the_kept_questions_and_their_provenance(base_dir, tmp_path, capsys):
    model = answering_model(base_dir)
    fmt = get_prompt_format("qa")
    first = greedy_ids_reference(model, model.tokenizer, fmt.encode_prompt(model.tokenizer, QUESTIONS[0])).split()
    assert first
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "a", "question": QUESTIONS[0], "answers": [first[0]]}) + "\n"
                  + json.dumps({"id": "b", "question": QUESTIONS[1], "answer": "zzqx"}) + "\n")
    out = tmp_path / "probe" / "kept.jsonl"
    assert main(["data", "probe", str(qa), "--model", str(base_dir), "--out", str(out), "--prompt-format", "qa",
                 "--device", "cpu"]) == 0
    assert "answers 1 of 2" in capsys.readouterr().out
    fmt_read, items = read_data(out)
    assert fmt_read.kind == "qa" and [i.id for i in items] == ["a"]
    provenance = json.loads(provenance_path(out).read_text())
    assert provenance["model_hash"] == model.model_hash and provenance["kept"] == 1 and provenance["asked"] == 2
    assert provenance["source"]["name"] == "qa.jsonl"


def test_data_probe_bad_input_writes_nothing(base_dir, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d", "text": "some text"}) + "\n")
    out = tmp_path / "out" / "kept.jsonl"
    assert main(["data", "probe", str(docs), "--model", str(base_dir), "--out", str(out), "--device", "cpu"]) == 2
    assert "takes a qa file" in capsys.readouterr().err
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Who wrote Emma?", "answer": "Jane Austen"}) + "\n")
    # the micro tokenizer has no chat template: refused before anything is written
    assert main(["data", "probe", str(qa), "--model", str(base_dir), "--out", str(out), "--prompt-format", "chat",
                 "--device", "cpu"]) == 2
    assert "chat_template" in capsys.readouterr().err
    assert not out.parent.exists()
    with pytest.raises(ConfigError, match="no questions"):
        build_probe(answering_model(base_dir), [], prompt_format="qa")


def test_the_real_knowledge_set_is_a_clean_qa_file():
    fmt, items = read_data(REAL_KNOWLEDGE)
    assert fmt.kind == "qa" and len(items) >= 300
    assert len({i.question for i in items}) == len(items)
    assert all(i.question.endswith("?") and 1 <= len(i.answers) for i in items)
    categories = {i.id.rsplit("-", 1)[0] for i in items}
    assert {"capital", "author", "element", "planet", "inventor"} <= categories
