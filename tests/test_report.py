"""smviz.report: diff and run reports from a micro workspace — numbers against the library, no network
references in the HTML, hostile text escaped, bad input refused with nothing written."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from smviz.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    return build_micro_workspace(tmp_path_factory.mktemp("report") / "ws", stats_batches=10, trace=False)


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
    other = MemoryModel.from_preset("micro", seed=0, vocab_size=512, knn=4)
    other.tokenizer = MemoryModel.from_pretrained(ws.model("micro")).tokenizer
    other.save_pretrained(tmp_path / "other")
    different = list(args)
    different[different.index("--after") + 1] = str(tmp_path / "other")
    assert main(different) == 2
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
