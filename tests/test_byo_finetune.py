"""`smviz finetune` on the data users bring (issue 15): CounterFact and zsRE files learned with sparse,
full and LoRA, their editing metrics in summary.json equal to the metrics recomputed independently on the
base model and on the run's saved model; a documents stream measured by a QA file; two named forgetting
probes in metrics.jsonl and summary.json; and each bad input a one-line error that writes nothing."""

from __future__ import annotations

import json

import pytest

from smviz.cli import main
from smviz.data.formats import read_data
from smviz.evaluate import EDIT_METRICS, answer_qa_items, edit_scores, mean_edit_metrics, qa_metrics
from smviz.model import MemoryModel

from micro_workspace import build_micro_workspace
from test_edit_formats import COUNTERFACT, ZSRE, write_json, write_jsonl

QA_A = [{"question": "Where was Ada born?", "answer": "Paris"}, {"question": "Who wrote Emma?", "answers": ["Jane Austen", "Austen"]}]
QA_B = [{"id": "sum", "question": "What is two and two?", "answer": "four"}]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    ws = build_micro_workspace(root / "ws", trace=False, runs=())
    write_json(root / "counterfact.json", COUNTERFACT)
    write_jsonl(root / "zsre.jsonl", ZSRE)
    write_jsonl(root / "probe-a.jsonl", QA_A)
    write_jsonl(root / "probe-b.jsonl", QA_B)
    return ws


def finetune(ws, out, *extra):
    args = ["finetune", "--model", str(ws.model("micro")), "--out", str(out), "--workspace", str(ws.root / "nowhere"),
            "--top-t", "16", "--batch-size", "4", "--steps-per-fact", "1", "--eval-every", "2", "--heldout",
            str(ws.data / "corpus-heldout.jsonl"), "--heldout-rows", "2", "--device", "cpu", "--json", *extra]
    return main(args)


def metrics_lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sample, method", [("counterfact.json", "sparse"), ("counterfact.json", "full"), ("counterfact.json", "lora"),
                                            ("zsre.jsonl", "sparse"), ("zsre.jsonl", "full"), ("zsre.jsonl", "lora")])
def test_editing_records_learned_with_each_method_report_editing_metrics_before_and_after(ws, sample, method, capsys):
    src = ws.root.parent / sample
    out = ws.root.parent / "runs" / f"{sample}-{method}"
    assert finetune(ws, out, "--stream", str(src), "--method", method, "--lr", "0.05" if method != "sparse" else "1.0") == 0, \
        capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    _, records = read_data(src)
    assert summary["stream"] == {"kind": "edits", "prompt_format": "completion"} and summary["facts"] == len(records)
    assert summary["steps"] == len(records)
    editing = summary["metrics"]["editing"]
    assert set(editing) == set(EDIT_METRICS)
    # independent recomputation: the base model before, the run's saved model after
    base = MemoryModel.from_pretrained(ws.model("micro"))
    after = MemoryModel.from_pretrained(out / "model")
    before_ref, after_ref = (mean_edit_metrics(edit_scores(m, records)) for m in (base, after))
    for name in EDIT_METRICS:
        assert editing[name]["start"] == pytest.approx(before_ref[name]), name
        assert editing[name]["end"] == pytest.approx(after_ref[name]), name
        if editing[name]["start"] is not None:
            assert editing[name]["change"] == pytest.approx(editing[name]["end"] - editing[name]["start"])
    if sample == "zsre.jsonl":
        assert editing["locality_prob"]["start"] is not None  # zsRE's loc / loc_ans is its neighborhood
    assert "editing" in summary["protocol"] and "ROME" in summary["protocol"]["editing"]
    # every evaluation point carries them; the learning metrics are not measured (no QA set)
    lines = metrics_lines(out)
    assert all(set(m["editing"]) == {*EDIT_METRICS, "n"} for m in lines)
    assert summary["metrics"]["learning_em"] == {"start": None, "end": None, "gain": None}
    assert summary["metrics"]["known_em"]["start"] is None  # no known facts given, none in the workspace


def test_editing_lowers_the_nll_of_the_new_target(ws, capsys):
    """Full finetuning on the rewrite prompt makes target_new likelier there (the edit takes effect)."""
    out = ws.root.parent / "runs" / "cf-full-strong"
    assert finetune(ws, out, "--stream", str(ws.root.parent / "counterfact.json"), "--method", "full", "--lr", "0.01",
                    "--steps-per-fact", "4") == 0, capsys.readouterr().err
    _, records = read_data(ws.root.parent / "counterfact.json")
    before = edit_scores(MemoryModel.from_pretrained(ws.model("micro")), records)
    after = edit_scores(MemoryModel.from_pretrained(out / "model"), records)
    assert all(a["nll_new"] < b["nll_new"] for a, b in zip(after, before))
    assert json.loads(capsys.readouterr().out)["metrics"]["editing"]["efficacy_prob"]["end"] == 1.0


def test_documents_stream_with_a_qa_learning_set_and_two_named_probes(ws, capsys):
    root = ws.root.parent
    facts = [json.loads(line) for line in (ws.data / "facts-new.jsonl").read_text().splitlines()][:2]
    docs = write_jsonl(root / "bios.jsonl", [{"id": f["id"], "text": " ".join(f["statements"][:6])} for f in facts])
    learn = write_jsonl(root / "learn.jsonl", [{"question": q["text"], "answer": f["answer"]}
                                               for f in facts for q in f["questions"] if q["heldout"]])
    out = root / "runs" / "docs"
    assert finetune(ws, out, "--stream", str(docs), "--learn-eval", str(learn), "--method", "full",
                    "--forget-eval", f"a={root / 'probe-a.jsonl'}", "--forget-eval", f"b={root / 'probe-b.jsonl'}") == 0, \
        capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["stream"] == {"kind": "documents", "context": 128} and summary["steps"] == 2
    m = summary["metrics"]
    # learning is measured on the QA file, at the start and at the end, on the saved model
    _, learn_items = read_data(learn)
    end_ref = qa_metrics(answer_qa_items(MemoryModel.from_pretrained(out / "model"), learn_items))
    start_ref = qa_metrics(answer_qa_items(MemoryModel.from_pretrained(ws.model("micro")), learn_items))
    assert (m["learning_f1"]["start"], m["learning_f1"]["end"]) == pytest.approx((start_ref["f1"], end_ref["f1"]))
    # both probes, in every metrics line and in the summary, with the probe's own numbers
    lines = metrics_lines(out)
    assert all(set(line["forget"]) == {"a", "b"} for line in lines)
    assert lines[0]["forget"]["a"]["n"] == 2 and lines[0]["forget"]["b"]["n"] == 1
    assert set(m["forget"]) == {"a", "b"}
    for name in ("a", "b"):
        assert m["forget"][name]["f1"]["start"] == lines[0]["forget"][name]["f1"]
        assert m["forget"][name]["f1"]["end"] == lines[-1]["forget"][name]["f1"]
    _, probe_b = read_data(root / "probe-b.jsonl")
    ref_b = qa_metrics(answer_qa_items(MemoryModel.from_pretrained(out / "model"), probe_b))
    assert lines[-1]["forget"]["b"]["em"] == ref_b["em"]
    assert set(summary["protocol"]) >= {"learning", "forget/a", "forget/b", "heldout_nll"}
    assert summary["protocol"]["sources"]["stream"]["format"] == "documents"


def write_bad(root, name, content: str | bytes):
    path = root / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_each_bad_input_is_one_line_naming_the_file_and_writes_nothing(ws, capsys):
    root = ws.root.parent / "bad"
    root.mkdir()
    cf = json.loads(json.dumps(COUNTERFACT))
    no_braces = json.loads(json.dumps(COUNTERFACT))
    no_braces[1]["requested_rewrite"]["prompt"] = "Edwin is affiliated with the religion of"
    zsre_bad_subject = json.loads(json.dumps(ZSRE))
    zsre_bad_subject[1]["subject"] = "Lichens"
    qa = write_jsonl(root / "qa.jsonl", QA_A)
    cases = [
        # (flags, what the one-line message must say)
        (["--stream", str(write_bad(root, "list.jsonl", json.dumps(QA_A))), "--stream-format", "qa", "--learn-eval", str(qa)],
         "list.jsonl, line 1: a JSON list, but 'qa' files are JSONL"),
        # the reverse: JSON lists line by line, where one JSON list is expected (CounterFact's layout; the editing
        # formats also take their records as JSONL, one object per line, which is not an error)
        (["--stream", str(write_bad(root, "cf-lists.json", "".join(json.dumps([c]) + "\n" for c in cf)))],
         "cf-lists.json, line 2: not a valid JSON list (Extra data)"),
        (["--stream", str(write_json(root / "no-braces.json", no_braces))], "no-braces.json, record 1"),
        (["--stream", str(write_json(root / "zsre-subject.json", zsre_bad_subject))], "zsre-subject.json, record 1"),
        (["--stream", str(qa), "--learn-eval", str(write_bad(root, "empty-answers.jsonl", '{"question": "Who?", "answers": []}\n'))],
         "empty-answers.jsonl, line 1: answers is empty"),
        (["--stream", str(write_bad(root, "dup.jsonl", '{"id": "d", "text": "a"}\n{"id": "d", "text": "b"}\n')), "--learn-eval", str(qa)],
         "dup.jsonl, line 2: duplicate id 'd'"),
        (["--stream", str(write_bad(root, "latin1.jsonl", '{"id": "Jos\xe9", "text": "x"}\n'.encode("latin-1")))], "latin1.jsonl, line 1"),
        (["--stream", str(write_bad(root, "huge.jsonl", json.dumps({"id": "h", "text": "x" * 5_000_000}) + "\n")), "--learn-eval", str(qa)],
         "huge.jsonl, line 1: 5,000,023 characters, more than 1,000,000 on one line"),
        (["--stream", str(write_bad(root, "empty-doc.jsonl", '{"id": "e", "text": "  "}\n')), "--learn-eval", str(qa)],
         "empty-doc.jsonl, line 1: the text is empty"),
        (["--stream", str(qa)], f"{qa} holds Q/A items (format qa): as a stream they have no held-out questions of their own; "
                                "give the QA file that measures what they teach with --learn-eval QA_FILE"),
        (["--stream", str(write_bad(root, "docs.jsonl", '{"id": "d", "text": "some text"}\n'))], "docs.jsonl holds documents (format documents)"),
        (["--stream", str(qa), "--stream-format", "rome", "--learn-eval", str(qa)], "unknown data format 'rome'; choose one of"),
        (["--stream", str(ws.root.parent / "counterfact.json"), "--forget-eval", f"x={ws.root.parent / 'counterfact.json'}"],
         "counterfact.json holds editing records (format counterfact); --forget-eval x= takes a qa file"),
        (["--stream", str(ws.root.parent / "counterfact.json"), "--forget-eval", str(qa)], "--forget-eval takes NAME=QA_FILE"),
        (["--stream", str(ws.root.parent / "counterfact.json"), "--forget-eval", f"a={qa}", "--forget-eval", f"a={qa}"],
         "--forget-eval a is given twice"),
        (["--stream", str(ws.root.parent / "counterfact.json"), "--prompt-format", "chat"], "prompt format 'chat' needs a tokenizer with a chat_template"),
    ]
    for i, (flags, message) in enumerate(cases):
        out = root / f"run{i}"
        code = finetune(ws, out, *flags)
        err = capsys.readouterr().err
        assert code == 2, (flags, err)
        assert err.startswith("smviz finetune: error: ") and err.count("\n") == 1, (flags, err)
        assert message in err, (flags, err)
        assert not out.exists(), flags


def test_chat_prompt_format_trains_and_asks_in_the_models_chat_template(ws, tmp_path, capsys):
    from smviz.data.prompts import get_prompt_format
    from smviz.train.stream import Stream

    model = MemoryModel.from_pretrained(ws.model("micro"))
    model.tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    model.save_pretrained(tmp_path / "chat-model")
    qa = write_jsonl(tmp_path / "qa.jsonl", QA_A)
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tmp_path / "chat-model"), "--out", str(out), "--workspace", str(ws.root),
            "--stream", str(qa), "--learn-eval", str(qa), "--prompt-format", "chat", "--method", "full", "--batch-size", "2",
            "--steps-per-fact", "1", "--heldout-rows", "1", "--known-facts", "2", "--device", "cpu", "--json"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["stream"] == {"kind": "qa", "prompt_format": "chat"} and summary["protocol"]["prompt_format"] == "chat"
    # what was trained: the template's user turn and assistant answer, then end-of-text
    tok = MemoryModel.from_pretrained(tmp_path / "chat-model").tokenizer
    text = "<|user|>Where was Ada born?\n<|assistant|>Paris\n"
    assert get_prompt_format("chat").training_text(tok, "Where was Ada born?", "Paris") == text
    _, items = read_data(qa)
    row = Stream(items, tok, batch_size=1, prompt_format="chat").rows(0)[0]
    assert list(row.ids) == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # what was asked: the template's generation prompt; the learning numbers are those of that protocol
    end = qa_metrics(answer_qa_items(MemoryModel.from_pretrained(out / "model"), items, prompt_format="chat"))
    assert summary["metrics"]["learning_f1"]["end"] == pytest.approx(end["f1"])
