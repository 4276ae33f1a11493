"""smviz.report: diff and run reports from a micro workspace — numbers against the library, no network
references in the HTML, hostile text escaped, bad input refused with nothing written."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import pytest

from smviz.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    return build_micro_workspace(tmp_path_factory.mktemp("report") / "ws", stats_batches=10, trace=False)


SUBJECT = "Ada <b>Lovelace</b> & <script>alert(1)</script>"  # the edits run's first subject


@pytest.fixture(scope="module")
def edits_run(ws):
    from micro_workspace import add_edits_run

    return add_edits_run(ws, "edits", subject=SUBJECT)


def _diff_args(ws, out, facts=None, fmt="html"):
    return ["report", "diff", "--before", str(ws.model("micro")), "--after", str(ws.run("sparse") / "model"),
            "--facts", str(facts or ws.data / "facts-new.jsonl"), "--known", str(ws.data / "facts-known.jsonl"),
            "--out", str(out), "--format", fmt]


@pytest.fixture(scope="module")
def diff_report(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report.html"
    assert main(_diff_args(ws, out)) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


RESOURCE = re.compile(r"""(?:\b(?:src|href|action|poster|data)\s*=\s*["']?\s*|url\(\s*["']?|@import\s+["']?)(?:https?:)?//""", re.I)


def _outside_plotly(page: str) -> str:
    """The page with the one inlined plotly.js block cut out (its code holds URL strings, not references)."""
    scripts = re.findall(r"<script\b[^>]*>", page, re.I)
    assert all("src" not in s.lower() for s in scripts), scripts
    start = page.index('<script type="text/javascript">')
    end = page.index("</script>", start)
    assert "Plotly" in page[start:end]
    return page[:start] + page[end:]


def test_diff_numbers_match_library(ws, diff_report):
    from smviz.analysis import Run, diff_run_model, fact_shift
    from smviz.data.facts import read_facts
    from smviz.evaluate import answer_questions, qa_metrics
    from smviz.model import MemoryModel

    _, rep = diff_report
    before, after = MemoryModel.from_pretrained(ws.model("micro")), MemoryModel.from_pretrained(ws.run("sparse") / "model")
    run = Run(ws.run("sparse"))
    assert rep["format"] == "smviz-report/1"
    assert rep["model_hashes"] == {"before": before.model_hash, "after": run.model_hash}
    for section in ("summary", "memory", "facts", "access_shift", "overlap", "top_slots"):
        assert rep["model_hashes"]["before"] in rep[section]["protocol"]
    diff = diff_run_model(run, ws.model("micro"))
    assert rep["memory"]["changed_slots"] == len(diff.slots) > 0
    assert rep["memory"]["violations"] == 0 == len(diff.violations)
    assert [r["slot"] for r in rep["memory"]["delta_norm"]] == diff.slots["slot"].tolist()
    facts = read_facts(ws.data / "facts-new.jsonl")
    shift = fact_shift(before, after, facts)
    assert [q["f1_after"] for q in rep["facts"]["questions"]] == pytest.approx(shift["f1_after"].tolist())
    for row in rep["facts"]["table"]:
        assert row["f1_before"] == pytest.approx(shift[shift["fact_id"] == row["fact_id"]]["f1_before"].mean())
        assert row["slots_trained"] <= len(diff.slots)
        assert {int(s.split(":")[1]) for s in row["slots"]} <= set(diff.slots["slot"])
    learn = {m["metric"]: m for m in rep["summary"]["metrics"]}
    assert learn["learning_f1"]["after"] == pytest.approx(qa_metrics(answer_questions(after, facts))["f1"])
    assert learn["known_em"]["before"] == pytest.approx(run.summary["metrics"]["known_em"]["start"])
    assert rep["access_shift"]["probe_size"] == sum(len(f.heldout_questions) for f in facts)
    assert len(rep["overlap"]["matrix"]) == len(facts)
    assert "not computed" not in rep["facts"]["protocol"]
    assert rep["top_slots"]["slots"] and rep["top_slots"]["slots"][0]["delta_norm"] == pytest.approx(diff.slots["delta_norm"].max())


def test_html_has_no_network_references(diff_report):
    out, _ = diff_report
    page = out.read_text()
    assert page.count("<script") >= 2  # plotly.js once, plus the figures' inline calls
    rest = _outside_plotly(page)
    assert not RESOURCE.search(rest), RESOURCE.search(rest)
    assert not re.search(r"<link\b", rest, re.I)
    assert "<h2>Per fact</h2>" in page and "plotly-graph-div" in page
    # the checker itself catches a reference
    assert RESOURCE.search('<img src="https://x/y.png">') and RESOURCE.search("a{background:url(http://x)}")


def test_run_reports_single_and_side_by_side(ws, tmp_path):
    from smviz.analysis import Run, churn

    assert main(["report", "run", str(ws.run("sparse")), "--out", str(tmp_path / "one.html")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    run = Run(ws.run("sparse"))
    assert one["runs"][0]["curves"] == json.loads(run.metrics.to_json(orient="records", double_precision=15))
    assert [r["churn"] is None for r in one["runs"][0]["dynamics"]["1"]["churn"]] == churn(run, 1)["churn"].isna().tolist()
    assert one["model_hashes"]["runs"]["sparse"] == {"before": run.base_model_hash, "after": run.model_hash}

    assert main(["report", "run", str(ws.run("sparse")), str(ws.run("full")), "--out", str(tmp_path / "two.html")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    assert [r["method"] for r in two["runs"]] == ["sparse", "full"]
    full = Run(ws.run("full"))
    assert two["runs"][1]["curves"] == json.loads(full.metrics.to_json(orient="records", double_precision=15))
    assert two["runs"][1]["dynamics"] is None
    assert two["runs"][1]["pareto"]["learning_f1_gain"] == pytest.approx(full.summary["metrics"]["learning_f1"]["gain"])
    page = (tmp_path / "two.html").read_text()
    assert "Learning vs forgetting per run" in page and not RESOURCE.search(_outside_plotly(page))


def test_markdown(ws, tmp_path):
    assert main(_diff_args(ws, tmp_path / "r.md", fmt="md")) == 0
    md = (tmp_path / "r.md").read_text()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "## Summary: learning and forgetting" in md
    assert "| metric | before | after | change | relative_drop |" in md
    assert rep["model_hashes"]["after"] in md and "<script" not in md
    assert not (tmp_path / "r.html").exists()


def test_hostile_text_is_escaped(ws, tmp_path):
    from smviz.data.facts import Question, read_facts, write_facts

    bad = "<script>alert(1)</script>"
    facts = read_facts(ws.data / "facts-new.jsonl")
    f = facts[0]
    hostile = dataclasses.replace(f, answer=f"{f.answer} {bad}", statements=tuple(f"{s} {bad}" for s in f.statements),
                                  questions=tuple(Question(f"{q.text} {bad}", q.template, q.heldout) for q in f.questions))
    write_facts(tmp_path / "hostile.jsonl", [hostile, *facts[1:]])
    assert main(_diff_args(ws, tmp_path / "h.html", facts=tmp_path / "hostile.jsonl")) == 0
    page = (tmp_path / "h.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)" not in page
    assert main(_diff_args(ws, tmp_path / "h.md", facts=tmp_path / "hostile.jsonl", fmt="md")) == 0
    assert "<script>alert(1)" not in (tmp_path / "h.md").read_text()


def test_bad_input_exits_2_and_writes_nothing(ws, tmp_path, capsys):
    from smviz.model import MemoryModel

    out = tmp_path / "bad" / "r.html"
    out.parent.mkdir()
    args = _diff_args(ws, out)
    missing = list(args)
    missing[missing.index("--before") + 1] = str(tmp_path / "nope")
    assert main(missing) == 2
    assert "does not exist" in capsys.readouterr().err
    other = MemoryModel.from_preset("micro", seed=0, vocab_size=512, knn=2)  # the preset reads 4 slots per head
    other.tokenizer = MemoryModel.from_pretrained(ws.model("micro")).tokenizer
    other.save_pretrained(tmp_path / "other")
    different = list(args)
    different[different.index("--after") + 1] = str(tmp_path / "other")
    assert main(different) == 2
    assert "knn" in capsys.readouterr().err  # a model with another memory config is not comparable
    (tmp_path / "empty.jsonl").write_text("")
    assert main(_diff_args(ws, out, facts=tmp_path / "empty.jsonl")) == 2
    assert main(["report", "run", str(tmp_path / "no-run"), "--out", str(out)]) == 2
    assert list(out.parent.iterdir()) == []
    assert "error" in capsys.readouterr().err


def test_diff_report_refuses_a_run_that_did_not_write_after(ws, tmp_path, capsys):
    """`--after RUN_A/model --run RUN_B`: B's allowances would judge A's model (a sparse model audited as
    full hides every violation); the run's final model must be the --after model, by hash."""
    from smviz.analysis import Run
    from smviz.errors import AnalysisError
    from smviz.report import build_diff_report

    out = tmp_path / "r.html"
    args = _diff_args(ws, out) + ["--run", str(ws.run("full"))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    full = Run(ws.run("full"))
    assert err.count("\n") == 0 and err.startswith("smviz report diff: error:") and "Traceback" not in err
    assert f"ended with model {full.model_hash}" in err and "give the run that wrote this model" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AnalysisError, match="ended with model"):
        build_diff_report(ws.model("micro"), ws.run("sparse") / "model", ws.data / "facts-new.jsonl",
                          ws.data / "facts-known.jsonl", run_dir=ws.run("full"))


def _html_tables(page: str) -> list[list[dict[str, str]]]:
    """Every <table> of a page as rows {header: cell text, unescaped}."""
    out = []
    for table in re.findall(r"<table>(.*?)</table>", page, re.S):
        head = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", table, re.S)]
        rows = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)] for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
        out.append([dict(zip(head, r)) for r in rows if r])
    return out


def _shown(x) -> str:
    """A number as the report shows it: 4 significant digits, — when not measured."""
    return "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def test_run_report_of_an_editing_run(edits_run, tmp_path):
    """Every named probe and the six editing metrics in the summary with summary.json's numbers; the
    stream's edit records listed, their markup escaped (HTML and Markdown)."""
    from micro_workspace import EDIT_PROBES

    from smviz.analysis import Run

    assert main(["report", "run", str(edits_run), "--out", str(tmp_path / "e.html")]) == 0
    page = (tmp_path / "e.html").read_text()
    rep = json.loads((tmp_path / "e.json").read_text())
    run = Run(edits_run)
    metrics = run.summary["metrics"]
    tables = _html_tables(page)
    summary = next({r["metric"]: r for r in t} for t in tables if t and "metric" in t[0] and "start" in t[0])
    for probe in EDIT_PROBES:
        for m in ("em", "f1"):
            want = metrics["forget"][probe][m]
            row = summary[f"forget/{probe}/{m}"]
            assert (row["start"], row["end"], row["relative_drop"]) == tuple(_shown(want[k]) for k in ("start", "end", "relative_drop"))
    editing = ("efficacy_prob", "efficacy_em", "generalization_prob", "generalization_em", "locality_prob", "locality_em")
    assert set(metrics["editing"]) == set(editing)
    for m in editing:
        want = metrics["editing"][m]
        row = summary[f"editing/{m}"]
        assert (row["start"], row["end"], row["change"]) == (_shown(want["start"]), _shown(want["end"]), _shown(want["end"] - want["start"]))
        assert {"metric": f"editing/{m}", **want} == next(r for r in rep["runs"][0]["summary"] if r["metric"] == f"editing/{m}")
    assert summary["known_f1"]["start"] == "—" and summary["heldout_nll"]["start"] == "—"  # not measured

    assert rep["runs"][0]["stream"] == "edits"
    items = next(t for t in tables if t and "rewrite_prompt" in t[0])
    assert [r["id"] for r in items] == ["0", "1", "2"]
    first = items[0]
    assert first["subject"] == SUBJECT and first["rewrite_prompt"] == f"The mother tongue of {SUBJECT} is"
    assert (first["target_true"], first["target_new"]) == ("French", "English")
    assert json.loads(first["paraphrase_prompts"]) == [f"{SUBJECT} spoke the language", f"The native language of {SUBJECT} is"]
    assert json.loads(first["neighborhood"]) == ["The mother tongue of Léon Blum is → French", "The native language of Montesquieu is → French"]
    assert "Ada &lt;b&gt;Lovelace&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>Lovelace" not in page and "<script>alert(1)" not in page
    assert not RESOURCE.search(_outside_plotly(page))

    assert main(["report", "run", str(edits_run), "--out", str(tmp_path / "e.md"), "--format", "md"]) == 0
    md = (tmp_path / "e.md").read_text()
    assert "| editing/locality_em |" in md and "| forget/capitals/f1 |" in md
    assert "Ada &lt;b&gt;Lovelace&lt;/b&gt; &amp; &lt;script&gt;" in md and "<b>" not in md and "<script" not in md


def test_run_report_pareto_point_without_known_facts(ws, edits_run, tmp_path):
    """Side by side with a facts run: the editing run (no known facts) is placed by its first probe."""
    from smviz.analysis import Run

    assert main(["report", "run", str(ws.run("sparse")), str(edits_run), "--out", str(tmp_path / "two.html")]) == 0
    rep = json.loads((tmp_path / "two.json").read_text())
    facts_run, edits = rep["runs"]
    summary = Run(edits_run).summary["metrics"]
    assert edits["pareto"] == {"learning_f1_gain": None, "known_f1_relative_drop": None, "forgetting_on": "probe books",
                               "forgetting_f1_relative_drop": summary["forget"]["books"]["f1"]["relative_drop"]}
    assert facts_run["pareto"]["forgetting_on"] == "known facts"
    assert facts_run["pareto"]["forgetting_f1_relative_drop"] == facts_run["pareto"]["known_f1_relative_drop"]
    assert [r["subject"] for r in facts_run["items"]["rows"]] == [f["subject"] for f in Run(ws.run("sparse")).items]
    page = (tmp_path / "two.html").read_text()
    assert "Learning vs forgetting per run" in page
    left_out = re.search(r"<p>not drawn \(learning gain[^<]*: ([^<]*)</p>", page).group(1).split(", ")
    assert "edits" in left_out  # no learning set: no learning F1 gain


# --------------------------------------------------------------------------- diff reports of editing records

EDIT_METRIC_NAMES = ("efficacy_prob", "efficacy_em", "generalization_prob", "generalization_em", "locality_prob", "locality_em")
FACTS_DIFF_KEYS = {
    "report": {"format", "kind", "compared", "model_hashes", "inputs", "summary", "memory", "facts", "access_shift", "overlap", "top_slots"},
    "facts": {"protocol", "table", "questions"},
    "row": {"fact_id", "subject", "relation", "gold", "statement", "questions", "answer_before", "answer_after", "f1_before",
            "f1_after", "slots_trained", "slots", "entity_share"},
    "overlap": {"protocol", "facts", "matrix"},
}


def test_facts_diff_keeps_its_keys(diff_report):
    """What tests above and readers of report.json use: a facts diff's sections and per-fact columns."""
    _, rep = diff_report
    assert set(rep) == FACTS_DIFF_KEYS["report"] and rep["compared"] == "facts"
    assert set(rep["facts"]) == FACTS_DIFF_KEYS["facts"] and set(rep["overlap"]) == FACTS_DIFF_KEYS["overlap"]
    assert all(set(row) == FACTS_DIFF_KEYS["row"] for row in rep["facts"]["table"])
    assert [m["metric"] for m in rep["summary"]["metrics"]] == ["learning_em", "learning_f1", "known_em", "known_f1"]
    assert rep["inputs"]["known"] == "facts-known.jsonl"


def _greedy(model, ids: list[int], n: int) -> str:
    """Greedy decoding by hand (one unpadded forward per token, argmax): the reference for continuations."""
    import torch

    tok, out = model.tokenizer, []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            if "\n" in tok.decode([nxt]):
                break
    return tok.decode(out, skip_special_tokens=True).split("\n", 1)[0].strip()


@pytest.fixture(scope="module")
def edits_diff(ws, edits_run, tmp_path_factory):
    """`smviz report diff` of the editing run: its stream (smviz edits JSONL) as --facts, no --known, --heldout."""
    out = tmp_path_factory.mktemp("edits-diff") / "d.html"
    args = ["report", "diff", "--before", str(ws.model("micro")), "--after", str(edits_run / "model"),
            "--facts", str(ws.root / "edits-stream.jsonl"), "--heldout", str(ws.data / "corpus-heldout.jsonl"), "--out", str(out)]
    assert main(args) == 0
    assert main(args[:-2] + ["--out", str(out.with_suffix(".md")), "--format", "md"]) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_edits_diff_numbers(ws, edits_run, edits_diff):
    """The summary's editing metrics are mean_edit_metrics of edit_scores on both models; per record:
    subject, rewrite prompt, greedy continuations (by hand), slots trained (reads of the rewrite text by
    hand ∩ changed rows); access shift on the 3 rewrite + 4 paraphrase prompts."""
    import numpy as np
    import torch

    from smviz.analysis import access_shift, diff_run_model
    from smviz.data.formats import read_data
    from smviz.evaluate import edit_scores, mean_edit_metrics
    from smviz.model import MemoryModel
    from smviz.record import AccessRecorder

    _, rep = edits_diff
    before, after = MemoryModel.from_pretrained(ws.model("micro")), MemoryModel.from_pretrained(edits_run / "model")
    fmt, recs = read_data(ws.root / "edits-stream.jsonl")
    assert fmt.kind == "edits" and rep["compared"] == "edits" and "facts" not in rep
    scores = {"before": edit_scores(before, recs), "after": edit_scores(after, recs)}
    means = {k: mean_edit_metrics(v) for k, v in scores.items()}
    metrics = {m["metric"]: m for m in rep["summary"]["metrics"]}
    assert list(metrics) == [*EDIT_METRIC_NAMES, "heldout_nll"]  # no --known: no known-fact rows
    for m in EDIT_METRIC_NAMES:
        assert metrics[m]["before"] == pytest.approx(means["before"][m]) and metrics[m]["after"] == pytest.approx(means["after"][m])
        assert metrics[m]["change"] == pytest.approx(means["after"][m] - means["before"][m])
    assert means["before"]["locality_prob"] is not None  # records 0 and 1 have neighbours
    assert "no --known given" in rep["summary"]["protocol"] and "efficacy_prob" in rep["summary"]["protocol"]
    assert rep["inputs"]["known"] is None

    table = rep["edits"]["table"]
    assert [r["id"] for r in table] == ["0", "1", "2"]
    assert [r["subject"] for r in table] == [SUBJECT, "Edwin of Northumbria", "Toko Yasuda"]
    assert table[0]["rewrite_prompt"] == f"The mother tongue of {SUBJECT} is"
    assert table[2]["rewrite_prompt"] == "Toko Yasuda, the"
    assert [(r["target_true"], r["target_new"]) for r in table] == [("French", "English"), ("Islam", "Christianity"), ("guitar", "piano")]
    diff = diff_run_model(edits_run, ws.model("micro"))
    changed = set(diff.slots["slot"].astype(int))
    assert changed
    for row, rec, sb, sa in zip(table, recs, scores["before"], scores["after"]):
        for when, s in (("before", sb), ("after", sa)):
            assert row[f"efficacy_prob_{when}"] == s["efficacy_prob"] and row[f"nll_new_{when}"] == pytest.approx(s["nll_new"])
        ids = before.tokenizer(rec.rewrite_prompt)["input_ids"]
        assert (row["continuation_before"], row["continuation_after"]) == (_greedy(before, ids, 8), _greedy(after, ids, 8))
        text_ids = before.tokenizer(f"{rec.rewrite_prompt} {rec.target_new}", add_special_tokens=False)["input_ids"]
        with torch.no_grad(), AccessRecorder(before) as recorder:
            before(input_ids=torch.tensor([text_ids]))
        (layer,) = before.memory_layers  # the micro model has one memory layer
        read = set(np.unique(recorder.batches[0].slots[:, 0]).tolist())
        assert row["slots"] == [f"{layer}:{s}" for s in sorted(read & changed)] and row["slots_trained"] == len(read & changed)
    assert any(r["slots_trained"] for r in table)
    if "not computed" in rep["edits"]["protocol"]:
        assert all(r["entity_share"] is None for r in table)

    prompts = [p for r in recs for p in (r.rewrite_prompt, *r.paraphrase_prompts)]
    assert rep["access_shift"]["probe_size"] == 7 == len(prompts)
    assert rep["access_shift"]["jaccard"] == pytest.approx(access_shift(before, after, prompts)["jaccard"].tolist())
    assert "rewrite prompts and their 4 paraphrase prompts" in rep["access_shift"]["protocol"]
    assert set(rep["overlap"]["edits"]) <= {"0", "1", "2"} and len(rep["overlap"]["matrix"]) == len(rep["overlap"]["edits"])
    for s in rep["top_slots"]["slots"]:
        assert {c["doc_id"] for c in s["contexts"]} <= {"0", "1", "2"}


def test_edits_diff_renders_escaped(edits_diff):
    out, _ = edits_diff
    page = out.read_text()
    assert "<h2>Summary: editing and forgetting</h2>" in page and "<h2>Per editing record</h2>" in page
    row = next(r for t in _html_tables(page) if t and "rewrite_prompt" in t[0] for r in t)
    assert row["subject"] == SUBJECT and row["rewrite_prompt"] == f"The mother tongue of {SUBJECT} is"
    assert "Ada &lt;b&gt;Lovelace&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>Lovelace" not in page and "<script>alert(1)" not in page
    assert not RESOURCE.search(_outside_plotly(page))
    md = out.with_suffix(".md").read_text()
    assert "## Summary: editing and forgetting" in md and "| efficacy_prob |" in md
    assert "Ada &lt;b&gt;Lovelace&lt;/b&gt; &amp; &lt;script&gt;" in md and "<b>" not in md and "<script" not in md


def test_diff_items_detect_counterfact_and_refuse_qa(ws, edits_run, tmp_path, capsys):
    """--facts: a CounterFact JSON list is read as editing records (as the stream it was converted to); a
    QA file is refused in one line, nothing written."""
    from smviz.data.formats import read_data
    from smviz.report.diff_items import EditItems, FactItems, read_diff_items

    _, recs = read_data(ws.root / "edits-stream.jsonl")
    cases = [{"case_id": int(r.id), "requested_rewrite": {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
                                                          "target_true": {"str": r.target_true}, "relation_id": "P0"},
              "paraphrase_prompts": list(r.paraphrase_prompts), "neighborhood_prompts": [p for p, _ in r.neighborhood]}
             for r in recs]
    (tmp_path / "cf.json").write_text(json.dumps(cases))
    items = read_diff_items(tmp_path / "cf.json")
    assert isinstance(items, EditItems) and items.items == recs
    assert isinstance(read_diff_items(ws.data / "facts-new.jsonl"), FactItems)

    (tmp_path / "qa.jsonl").write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n')
    out = tmp_path / "out" / "r.html"
    out.parent.mkdir()
    args = _diff_args(ws, out, facts=tmp_path / "qa.jsonl")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("smviz report diff: error:") and "Traceback" not in err
    assert "holds Q/A items" in err and "a diff report compares facts or editing records" in err
    assert list(out.parent.iterdir()) == []


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_diff_of_a_chat_run_asks_in_chat(ws, tmp_path):
    """A diff of a run made with --prompt-format chat asks the new and the known facts in chat, as the run
    did (its evaluation protocol says so; the facts stream's identity does not): learning and known
    numbers are qa_metrics of answer_questions in chat on both models, the per-question answers are those
    answers (not the qa ones), the access shift probes the chat prompts and the protocols name the format.
    --prompt-format qa asks in qa again. The untrained micro model answers nothing right, so each fact's
    gold is set to the before model's chat answer to its first held-out question: chat scores > 0, qa 0."""
    from smviz.analysis import Run, question_access_shift
    from smviz.data.facts import read_facts, write_facts
    from smviz.evaluate import answer_questions, qa_metrics
    from smviz.model import MemoryModel
    from smviz.train.finetune import FinetuneConfig
    from smviz.workspace.stages import run_finetune

    model = MemoryModel.from_pretrained(ws.model("micro"))
    model.tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "chat-model")
    config = FinetuneConfig(method="full", batch_size=2, steps_per_fact=1, eval_every=3, composition="statements")
    run_finetune(tmp_path / "chat-model", tmp_path / "run", config, stream=ws.data / "facts-new.jsonl",
                 known=ws.data / "facts-known.jsonl", prompt_format="chat", max_facts=3, known_facts=4, progress=False)
    run = Run(tmp_path / "run")
    assert "prompt_format" not in run.identity["stream"] and run.identity["evaluation"]["prompt_format"] == "chat"

    before, after = MemoryModel.from_pretrained(tmp_path / "chat-model"), MemoryModel.from_pretrained(tmp_path / "run" / "model")
    sets = {}
    for name in ("new", "known"):
        facts = read_facts(ws.data / f"facts-{name}.jsonl")[:6]
        first = {}
        for r in answer_questions(before, facts, prompt_format="chat"):
            first.setdefault(r["fact_id"], r["prediction"] or "nothing")
        sets[name] = [dataclasses.replace(f, answer=first[f.id]) for f in facts]
        write_facts(tmp_path / f"{name}.jsonl", sets[name])
    args = ["report", "diff", "--before", str(tmp_path / "chat-model"), "--after", str(tmp_path / "run" / "model"),
            "--facts", str(tmp_path / "new.jsonl"), "--known", str(tmp_path / "known.jsonl"), "--out"]
    assert main(args + [str(tmp_path / "chat.html")]) == 0
    rep = json.loads((tmp_path / "chat.json").read_text())
    assert rep["inputs"]["run"] == str(run.path)

    def numbers(report, fmt):
        """The report's learning/known rows checked against answer_questions in `fmt`; its per-question answers."""
        shown = {m["metric"]: m for m in report["summary"]["metrics"]}
        for name, metric in (("new", "learning"), ("known", "known")):
            for side, m in (("before", before), ("after", after)):
                ref = qa_metrics(answer_questions(m, sets[name], prompt_format=fmt))
                assert [shown[f"{metric}_{k}"][side] for k in ("em", "f1")] == pytest.approx([ref["em"], ref["f1"]]), (name, side)
        return shown, [[q["answer_before"], q["answer_after"]] for q in report["facts"]["questions"]]

    shown, chat_answers = numbers(rep, "chat")
    assert shown["learning_em"]["before"] > 0 and shown["known_em"]["before"] > 0  # the golds are chat answers
    assert chat_answers == [[r["prediction"], s["prediction"]] for r, s in zip(
        answer_questions(before, sets["new"], prompt_format="chat"), answer_questions(after, sets["new"], prompt_format="chat"))]
    ash = question_access_shift(before, after, sets["new"], prompt_format="chat")
    assert rep["access_shift"]["jaccard"] == pytest.approx(ash["jaccard"].tolist())
    assert "as chat prompt text" in rep["access_shift"]["protocol"]
    assert rep["summary"]["protocol"].count("asked in prompt format chat") == 2  # learning and known
    assert "asked in prompt format chat" in rep["facts"]["protocol"]

    assert main(args + [str(tmp_path / "qa.html"), "--prompt-format", "qa"]) == 0
    qa = json.loads((tmp_path / "qa.json").read_text())
    shown, qa_answers = numbers(qa, "qa")
    assert qa_answers != chat_answers and shown["learning_em"]["before"] == 0 == shown["known_em"]["before"]
    assert "prompt format" not in qa["summary"]["protocol"] and "as qa_prompt text" in qa["access_shift"]["protocol"]
