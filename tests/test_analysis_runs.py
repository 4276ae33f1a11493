"""Reading a run directory of any stream (`smviz.analysis.Run`): metrics.jsonl's nested probe and editing
records flattened into columns with the logged values, the stream's kind and items, the readable item
table of each kind; and what the run report and the curves make of them (`summary_rows`, `pareto_point`,
`learning_curves` panels). Run directories are written by hand: every expected value is in the test."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from smviz.analysis import Run
from smviz.analysis.runs import DOCUMENT_START, item_rows
from smviz.errors import RunError
from smviz.train.rundir import RUN_FORMAT, FinetuneRunDir

EDIT = {"id": "e1", "subject": "Toko Yasuda", "prompt": "{}, the", "target_new": "piano", "target_true": "guitar",
        "paraphrase_prompts": ["Toko Yasuda plays the"], "neighborhood": [{"prompt": "Eric Clapton plays the", "answer": "guitar"}],
        "source": "counterfact"}
POINT = {"step": 0, "facts_seen": 0, "learn_em": None, "learn_f1": None, "stream_em": None, "stream_f1": None,
         "known_em": None, "known_f1": None,
         "forget": {"books": {"em": 0.5, "f1": 0.75, "n": 2}, "capitals": {"em": 0.0, "f1": 0.25, "n": 4}},
         "editing": {"efficacy_prob": 1.0, "efficacy_em": 0.0, "generalization_prob": None, "generalization_em": None,
                     "locality_prob": 0.5, "locality_em": 0.5, "n": 1},
         "heldout_nll": None}


def _run_dir(path, metrics, *, stream=None, items=None):
    d = FinetuneRunDir(path)
    identity = {"format": RUN_FORMAT, "base_model_hash": "b0", "config": {"method": "sparse"}}
    if stream is not None:
        identity["stream"] = {"kind": stream, "ids": [i["id"] for i in items or []], "fingerprint": "f0"}
    d.write_identity(identity)
    for m in metrics:
        d.append_metrics(m)
    if items is not None:
        d.write_stream(items)
    return Run(path)


def test_metrics_flatten_probes_and_editing(tmp_path):
    later = {**POINT, "step": 1, "facts_seen": 1, "forget": {"books": {"em": 0.0, "f1": 0.5, "n": 2}, "capitals": {"em": 0.0, "f1": 0.0, "n": 4}},
             "editing": {**POINT["editing"], "efficacy_em": 1.0}}
    run = _run_dir(tmp_path / "r", [POINT, later], stream="edits", items=[EDIT])
    m = run.metrics
    assert list(m.columns) == ["step", "facts_seen", "learn_em", "learn_f1", "stream_em", "stream_f1", "known_em", "known_f1",
                               "heldout_nll", "forget/books/em", "forget/books/f1", "forget/books/n", "forget/capitals/em",
                               "forget/capitals/f1", "forget/capitals/n", "editing/efficacy_prob", "editing/efficacy_em",
                               "editing/generalization_prob", "editing/generalization_em", "editing/locality_prob",
                               "editing/locality_em", "editing/n"]
    assert m["step"].tolist() == [0, 1]
    assert m["forget/books/f1"].tolist() == [0.75, 0.5] and m["forget/capitals/n"].tolist() == [4, 4]
    assert m["editing/efficacy_em"].tolist() == [0.0, 1.0] and m["editing/locality_prob"].tolist() == [0.5, 0.5]
    for column in ("known_f1", "heldout_nll", "learn_f1", "editing/generalization_prob"):  # not measured: NaN, column kept
        assert m[column].dtype == float and m[column].isna().all(), column
    assert run.stream == "edits" and run.items == [EDIT]


def test_run_written_before_streams(tmp_path):
    """No stream in config.json, no stream.jsonl, no nested records: a facts run with no items."""
    point = {k: v for k, v in POINT.items() if k not in ("forget", "editing")} | {"known_f1": 0.5, "heldout_nll": 3.0}
    run = _run_dir(tmp_path / "old", [point])
    assert run.stream == "facts" and run.items == [] and run.item_table().empty
    assert list(run.item_table().columns) == ["id", "subject", "relation", "answer", "statements", "questions"]
    assert "forget/books/f1" not in run.metrics.columns and run.metrics["known_f1"].tolist() == [0.5]


def test_item_rows_of_each_kind():
    fact = {"id": "f1", "subject": "Ada", "relation": "birthplace", "answer": "Paris", "statements": ["a", "b", "c"],
            "questions": [{"text": "q", "template": 0, "heldout": True}], "entities": []}
    assert item_rows("facts", [fact]).to_dict("records") == [
        {"id": "f1", "subject": "Ada", "relation": "birthplace", "answer": "Paris", "statements": 3, "questions": 1}]
    assert item_rows("qa", [{"id": "q1", "question": "Who wrote Emma?", "answers": ["Jane Austen", "Austen"]}]).to_dict("records") == [
        {"id": "q1", "question": "Who wrote Emma?", "answers": ["Jane Austen", "Austen"]}]
    long, short = "x" * (DOCUMENT_START + 5), "a short text"
    docs = item_rows("documents", [{"id": "d1", "text": long}, {"id": "d2", "text": short}])
    assert docs.to_dict("records") == [{"id": "d1", "chars": DOCUMENT_START + 5, "text": "x" * DOCUMENT_START + "…"},
                                       {"id": "d2", "chars": 12, "text": short}]
    assert item_rows("edits", [EDIT]).to_dict("records") == [
        {"id": "e1", "subject": "Toko Yasuda", "rewrite_prompt": "Toko Yasuda, the", "target_true": "guitar", "target_new": "piano",
         "paraphrase_prompts": ["Toko Yasuda plays the"], "neighborhood": ["Eric Clapton plays the → guitar"], "source": "counterfact"}]
    with pytest.raises(RunError, match="unknown kind of stream 'pictures'"):
        item_rows("pictures", [])


# ---------------------------------------------------------------- what the run report makes of them

SUMMARY = {
    "learning_f1": {"start": 0.0, "end": 0.5, "gain": 0.5},
    "known_f1": {"start": None, "end": None, "relative_drop": None},
    "heldout_nll": {"start": 3.0, "end": 3.3, "change": 0.3, "relative_change": 0.1},
    "forget": {"books": {"em": {"start": 0.5, "end": 0.25, "relative_drop": 0.5}, "f1": {"start": 0.8, "end": 0.6, "relative_drop": 0.25}},
               "capitals": {"em": {"start": 1.0, "end": 0.0, "relative_drop": 1.0}, "f1": {"start": 1.0, "end": 0.0, "relative_drop": 1.0}}},
    "editing": {"efficacy_prob": {"start": 0.0, "end": 1.0, "change": 1.0}},
}


def test_summary_rows_flatten_probes_and_editing():
    from smviz.report.run import summary_rows

    rows = summary_rows(SUMMARY)
    assert [r["metric"] for r in rows] == ["learning_f1", "known_f1", "heldout_nll", "forget/books/em", "forget/books/f1",
                                           "forget/capitals/em", "forget/capitals/f1", "editing/efficacy_prob"]
    assert rows[4] == {"metric": "forget/books/f1", "start": 0.8, "end": 0.6, "relative_drop": 0.25}
    assert rows[-1] == {"metric": "editing/efficacy_prob", "start": 0.0, "end": 1.0, "change": 1.0}


def test_pareto_point_falls_back_to_the_first_probe():
    from smviz.report.run import pareto_point

    assert pareto_point(SUMMARY) == {"learning_f1_gain": 0.5, "known_f1_relative_drop": None, "forgetting_on": "probe books",
                                     "forgetting_f1_relative_drop": 0.25}
    known = {**SUMMARY, "known_f1": {"start": 0.8, "end": 0.4, "relative_drop": 0.5}}
    assert pareto_point(known)["forgetting_on"] == "known facts" and pareto_point(known)["forgetting_f1_relative_drop"] == 0.5
    # known facts measured from 0: the drop is undefined, and the probes do not stand in for it
    zero = {**SUMMARY, "known_f1": {"start": 0.0, "end": 0.0, "relative_drop": None}}
    assert pareto_point(zero)["forgetting_on"] == "known facts" and pareto_point(zero)["forgetting_f1_relative_drop"] is None
    bare = {k: v for k, v in SUMMARY.items() if k != "forget"}
    assert pareto_point(bare)["forgetting_on"] is None and pareto_point(bare)["forgetting_f1_relative_drop"] is None


def test_learning_curves_panels_for_probes_editing_and_unmeasured(tmp_path):
    from smviz import figures

    edits = _run_dir(tmp_path / "e", [POINT, {**POINT, "step": 2}], stream="edits", items=[EDIT]).metrics.assign(run="edits")
    facts = pd.DataFrame({"step": [0, 2], "learn_f1": [0.0, 0.5], "known_f1": [1.0, 0.9], "heldout_nll": [3.0, None], "run": "facts"})
    fig = figures.learning_curves(pd.concat([facts, edits], ignore_index=True), by="run")
    titles = [a.text for a in fig.layout.annotations]
    # generalization (None in every record) draws no panel; known facts and NLL from the facts run only
    assert titles == ["learning: F1 on new facts", "forgetting: F1 on known facts", "forgetting: held-out NLL",
                      "forgetting: F1 on probe books", "forgetting: F1 on probe capitals", "editing: efficacy (probability)",
                      "editing: efficacy (greedy match)", "editing: locality (probability)", "editing: locality (greedy match)"]
    by_run = {name: [t for t in fig.data if t.name == name] for name in ("facts", "edits")}
    assert len(by_run["facts"]) == 3 and len(by_run["edits"]) == 6  # no line where a run measured nothing
    assert [sum(bool(t.showlegend) for t in ts) for ts in by_run.values()] == [1, 1]
    capitals = [t for t in by_run["edits"] if list(t.y) == [0.25, 0.25]]
    assert len(capitals) == 1 and capitals[0].xaxis == "x5"  # fifth panel: second row, middle
    assert math.isnan(list(by_run["facts"][2].y)[1])  # a missing NLL is a gap in the line
