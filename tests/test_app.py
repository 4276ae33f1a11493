"""The Streamlit app (app/): every page driven with AppTest on a micro workspace built once per module,
asserting the content shown; plus the `smviz app` command line and an empty workspace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest import ok, table  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "app"
XSS = "<script>alert(1)</script>"
SUBJECT = f"Ada <b>Lovelace</b> & {XSS}"  # the edits run's first subject: shown as text, never markup


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import add_edits_run, build_micro_workspace, record

    ws = build_micro_workspace(tmp_path_factory.mktemp("app") / "ws")
    hostile = ws.root / "hostile.jsonl"
    hostile.write_text(json.dumps({"id": "x0", "text": " ".join([XSS] * 4)}) + "\n")
    record(ws, hostile, "xss")
    add_edits_run(ws, "edits", subject=SUBJECT)
    return ws


def page(monkeypatch, ws, name: str) -> AppTest:
    monkeypatch.setenv("SMVIZ_WORKSPACE", str(ws.root if hasattr(ws, "root") else ws))
    path = APP / "Home.py" if name == "Home" else next((APP / "pages").glob(f"*_{name}.py"))
    return AppTest.from_file(str(path), default_timeout=60)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# ---------------------------------------------------------------- Overview


def test_overview_lists_workspace_and_usage(monkeypatch, ws):
    from smviz.trace import Trace

    at = ok(page(monkeypatch, ws, "Home").run())
    assert table(at, "model", "background stats")["model"].tolist() == ["micro"]
    traces = table(at, "trace", "accesses").set_index("trace")
    new = Trace.load(ws.trace("new"))
    assert traces.loc["new", "accesses"] == new.n_accesses and traces.loc["new", "documents"] == new.n_docs
    runs = table(at, "run", "method").set_index("run")
    assert runs.loc["sparse", "method"] == "sparse" and runs.loc["full", "method"] == "full"
    assert runs.loc["sparse", "steps"] == 6
    assert runs["stream"].to_dict() == {"edits": "edits", "full": "facts", "sparse": "facts"}
    assert runs.loc["edits", "items"] == 3 and runs.loc["edits", "steps"] == 3  # one step per record
    at.selectbox(key="usage_source").set_value("trace: new").run()
    usage = new.usage(new.layers[0])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dead slots"] == f"{int(usage['dead']):,} / {int(usage['slots']):,}"
    assert metrics["Gini"] == f"{usage['gini']:.3f}"
    assert table(at, "used_share")["used_share"].iloc[0] == pytest.approx(usage["used_share"])


def test_empty_workspace_shows_what_is_missing(monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    at = page(monkeypatch, tmp_path / "empty", "Home").run()
    assert not at.exception
    shown = texts(at.warning)
    assert "No models" in shown and "No traces" in shown and "No finetuning runs" in shown
    code = texts(at.code)
    assert "smviz demo --workspace" in code and "smviz record --model" in code and "--out" in code and "smviz finetune" in code
    for name, command in (("Slot", "smviz record"), ("Steps", "smviz finetune"), ("Diff", "smviz finetune"), ("Entities", "smviz record")):
        at = page(monkeypatch, tmp_path / "empty", name).run()
        assert not at.exception
        assert "no" in texts(at.warning).lower() and command in texts(at.code), name


def test_no_workspace_env(monkeypatch):
    monkeypatch.delenv("SMVIZ_WORKSPACE", raising=False)
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=60).run()
    assert "SMVIZ_WORKSPACE" in texts(at.error)


# ---------------------------------------------------------------- Slot


def test_slot_page_contexts_history_and_promoted(monkeypatch, ws):
    from smviz.analysis import Run, promoted_tokens
    from smviz.model import MemoryModel
    from smviz.trace import Trace

    trace = Trace.load(ws.trace("new"))
    index = trace.slot_index()
    run = Run(ws.run("sparse"))
    slot = int(run.steps["selected"].iloc[0][0])  # the first step's best slot
    at = page(monkeypatch, ws, "Slot")
    at.query_params["trace"] = "new"
    at.query_params["slot"] = str(slot)
    ok(at.run())
    at.selectbox(key="run").set_value("sparse").run()  # the edits run comes first
    ok(at)
    assert at.number_input(key="slot").value == slot and at.selectbox(key="trace").value == "new"
    assert any("Top contexts" in s.value for s in at.subheader)
    body = texts(at.markdown)
    expected = index.contexts(slot, n=20, window=8)
    assert body.count('class="smviz-context"') == len(expected)
    for _, row in expected.head(3).iterrows():
        assert f'">{row["token"]}</mark>' in body or f">{row['token'].replace('&', '&amp;')}</mark>" in body
        assert row["doc_id"] in body
    assert {m.label: m.value for m in at.metric}["Reads in trace"] == f"{index.count(slot):,}"
    hist = table(at, "step", "selected", "score")
    chosen = {int(s) for s, sel in zip(run.steps["step"], run.steps["selected"]) if slot in set(sel)}
    assert set(hist.loc[hist["selected"], "step"]) == chosen
    promoted = table(at, "direction", "logit")
    want = promoted_tokens(MemoryModel.from_pretrained(ws.model("micro")), slot, trace=trace, k=10)
    assert promoted["token_id"].tolist() == want["token_id"].tolist()
    co = table(at, "co_reads")
    assert slot not in co["slot"].tolist() and (np.diff(co["co_reads"].to_numpy()) <= 0).all()

    # pick another slot by id
    other = int(co["slot"].iloc[0])
    at.number_input(key="slot").set_value(other).run()
    ok(at)
    assert any(f"slot {other}" in s.value for s in at.subheader)
    assert texts(at.markdown).count('class="smviz-context"') == len(index.contexts(other, n=20))


def test_slot_page_entities(monkeypatch, ws):
    at = page(monkeypatch, ws, "Slot")
    at.query_params["slot"] = "0"
    ok(at.run())
    at.toggle(key="entities_on").set_value(True).run()
    ok(at)
    row = table(at, "entity_mass_share", "top1")
    assert row["slot"].tolist() == [0] and row["reads"].iloc[0] > 0


def test_slot_page_escapes_corpus_text(monkeypatch, ws):
    from smviz.trace import Trace

    trace = Trace.load(ws.trace("xss"))
    slot = int(np.argmax(trace.slot_counts()))
    at = page(monkeypatch, ws, "Slot")
    at.query_params["trace"] = "xss"
    at.query_params["slot"] = str(slot)
    ok(at.run())
    body = texts(at.markdown)
    assert 'class="smviz-context"' in body
    contexts = "".join(body.split('<div class="smviz-context">')[1:])
    assert "&lt;" in contexts and "script&gt;" in contexts  # the markup characters arrive escaped
    assert "<script" not in body and "</script" not in body and "<s" not in contexts.replace("<span", "")
    # the table view shows the same text as data
    shown = table(at, "left", "right")
    assert any("<" in t for t in shown["left"] + shown["token"] + shown["right"])


# ---------------------------------------------------------------- Fact


def test_fact_page(monkeypatch, ws):
    from smviz.analysis import Run, core_set
    from smviz.data.facts import read_facts
    from smviz.trace import Trace

    run = Run(ws.run("sparse"))
    fact_id = run.steps["fact_id"].iloc[-1]
    fact = next(f for f in read_facts(ws.data / "facts-new.jsonl") if f.id == fact_id)
    at = page(monkeypatch, ws, "Fact").run()
    at.selectbox(key="fact").set_value(fact_id).run()
    ok(at)
    assert any(fact_id in s.value for s in at.subheader)
    assert table(at, "statement")["statement"].tolist() == list(fact.statements)
    assert table(at, "question")["question"].tolist() == [q.text for q in fact.questions]
    assert at.selectbox(key="run").value == "sparse"  # runs that select slots come first
    per_token = table(at, "slots (strongest first)")
    doc = at.selectbox(key="doc").value
    assert doc.startswith(fact_id + ":")
    trace = Trace.load(ws.trace("new"))
    assert len(per_token) == len(trace.slot_index().slots_for(doc, 0, 10_000)["position"].unique())
    selected = table(at, "slot", "score", "step")
    mine = run.steps[run.steps["fact_id"] == fact_id]
    assert sorted(selected["step"].unique()) == sorted(mine["step"])
    assert set(selected["slot"]) == set(run.selected(by="fact")[fact_id].tolist())
    core = core_set(trace, fact_id).tolist()
    assert f"Core set ({len(core)} slots)" in texts(at.markdown)
    assert table(at, "core_size", "coverage")["core_size"].iloc[0] == len(core)
    answers = table(at, "answer_before", "answer_after", "f1_before", "f1_after")
    assert len(answers) == sum(q.heldout for q in fact.questions)
    at.button(key="ablate").click().run()
    ok(at)
    ablation = table(at, "set", "delta_logprob")
    assert (ablation["set"] == "real").sum() == 1 and (ablation["set"] == "random").sum() == 5
    assert f"Ablating the {len(run.selected(by='fact')[fact_id])} selected slots" in texts(at.markdown)


def test_fact_page_edit_record(monkeypatch, ws):
    """An editing run's record: its fields as text (the markup in the subject shown literally), its
    paraphrase and neighborhood prompts, its step and selected slots, its edit scores before and after."""
    from smviz.analysis import Run
    from smviz.data.edits import EditRecord
    from smviz.evaluate import edit_scores
    from smviz.model import MemoryModel

    run = Run(ws.run("edits"))
    record = EditRecord.from_dict(run.items[0])
    assert record.subject == SUBJECT
    at = ok(page(monkeypatch, ws, "Fact").run())
    assert at.selectbox(key="source").options[0].startswith("workspace facts")  # the fact world first, as before
    at.selectbox(key="source").set_value("run:edits").run()
    ok(at)
    assert at.selectbox(key="item").options == ["0", "1", "2"] and at.selectbox(key="item").value == "0"
    shown = [t.value for t in at.text]
    assert f"subject: {SUBJECT}" in shown
    assert f"rewrite: The mother tongue of {SUBJECT} is" in shown
    assert "edit: French → English" in shown
    assert not any("<b>" in m.value for m in at.markdown) and not any("<b>" in h.value for h in at.subheader)
    assert table(at, "paraphrase prompt")["paraphrase prompt"].tolist() == [f"{SUBJECT} spoke the language",
                                                                             f"The native language of {SUBJECT} is"]
    hood = table(at, "neighborhood prompt", "answer")
    assert list(zip(hood["neighborhood prompt"], hood["answer"])) == [("The mother tongue of Léon Blum is", "French"),
                                                                      ("The native language of Montesquieu is", "French")]
    assert table(at, "loss", "accessed")["step"].tolist() == [1]  # steps_per_fact=1: record 0 is step 1
    assert set(table(at, "slot", "score", "step")["slot"]) == set(run.selected(by="fact")["0"].tolist())
    scores = table(at, "model", "efficacy_prob").set_index("model")
    for name, model_dir in (("before", ws.model("micro")), ("after", run.model_dir)):
        want = edit_scores(MemoryModel.from_pretrained(model_dir), [record], prompt_format="completion")[0]
        assert scores.loc[name, "nll_new"] == pytest.approx(want["nll_new"]) and scores.loc[name, "efficacy_prob"] == want["efficacy_prob"]
    assert scores.loc["before", "nll_new"] != pytest.approx(scores.loc["after", "nll_new"])  # training moved the target

    at.selectbox(key="item").set_value("2").run()  # a record without neighborhood prompts
    ok(at)
    assert "subject: Toko Yasuda" in [t.value for t in at.text]
    assert len(table(at, "neighborhood prompt", "answer")) == 0


# ---------------------------------------------------------------- Entities


def test_entities_page(monkeypatch, ws):
    at = ok(page(monkeypatch, ws, "Entities").run())
    labels = at.selectbox(key="label").options
    assert "PERSON" in labels
    at.selectbox(key="label").set_value("PERSON").run()
    by_label = table(at, "share_PERSON")
    assert (np.diff(by_label["share_PERSON"].to_numpy()) <= 1e-12).all()
    assert by_label["open"].iloc[0] == f"/Slot?trace=new&slot={by_label['slot'].iloc[0]}"
    string = at.selectbox(key="string").options[0]
    at.selectbox(key="string").set_value(string).run()
    ok(at)
    ranked = table(at, "rank", "score", "count")
    assert ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    slot = int(by_label["slot"].iloc[0])
    at.number_input(key="slot").set_value(slot).run()
    ok(at)
    profile = table(at, "mass", "entity_mass", "log_odds")
    assert profile["slot"].tolist() == [slot]
    assert f"Slot {slot}: {int(profile['reads'].iloc[0])} reads" in texts(at.markdown)


# ---------------------------------------------------------------- Steps


def test_steps_page(monkeypatch, ws):
    from smviz.analysis import Run, churn, jaccard_matrix, selected_sets

    at = ok(page(monkeypatch, ws, "Steps").run())
    metrics = table(at, "learn_f1", "run")
    assert set(metrics["run"]) == {"edits (sparse)", "full (full)", "sparse (sparse)"}  # every run on shared axes
    assert at.selectbox(key="run").options == ["edits", "sparse"]
    at.selectbox(key="run").set_value("sparse").run()
    ok(at)
    run = Run(ws.run("sparse"))
    shown = table(at, "churn", "jaccard", "n_new")
    np.testing.assert_allclose(shown["churn"].to_numpy(), churn(run)["churn"].to_numpy(), equal_nan=True)
    at.radio(key="by").set_value("fact").run()
    ok(at)
    want = jaccard_matrix(selected_sets(run, by="fact")).round(3)
    got = [d.value for d in at.dataframe if list(d.value.columns) == list(want.columns)][0]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy())
    assert table(at, "n_facts", "n_steps")["slot"].iloc[0] >= 0


def test_steps_page_probes_and_editing(monkeypatch, ws):
    """The editing run's named probes and editing metrics: columns of the table (NaN in the fact runs'
    rows) and panels of the curves, with the values of its metrics.jsonl."""
    from micro_workspace import EDIT_PROBES

    from smviz.train.rundir import FinetuneRunDir

    at = ok(page(monkeypatch, ws, "Steps").run())
    metrics = table(at, "run", "forget/books/f1", "forget/capitals/f1", "editing/efficacy_prob")
    edits = metrics[metrics["run"] == "edits (sparse)"]
    logged = FinetuneRunDir(ws.run("edits")).metrics()
    assert edits["step"].tolist() == [r["step"] for r in logged] == [0, 1, 2, 3]
    for probe in EDIT_PROBES:
        for m in ("em", "f1", "n"):
            assert edits[f"forget/{probe}/{m}"].tolist() == [r["forget"][probe][m] for r in logged]
    assert edits["editing/locality_prob"].tolist() == [r["editing"]["locality_prob"] for r in logged]
    assert edits["known_f1"].isna().all() and edits["heldout_nll"].isna().all()  # not measured, column kept
    assert metrics[metrics["run"] != "edits (sparse)"]["forget/books/f1"].isna().all()
    chart = next(ch for ch in at.get("plotly_chart") if ch.key == "curves_fig")
    spec = json.loads(chart.proto.spec)
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    assert titles[:3] == ["learning: F1 on new facts", "forgetting: F1 on known facts", "forgetting: held-out NLL"]
    assert {"forgetting: F1 on probe books", "forgetting: F1 on probe capitals", "editing: efficacy (probability)",
            "editing: locality (greedy match)"} <= set(titles)
    lines = [t for t in spec["data"] if t["name"] == "edits (sparse)"]
    assert len(lines) == 2 + 6  # two probes, six editing metrics; no known facts, no held-out NLL


# ---------------------------------------------------------------- Diff


def test_diff_page_two_steps(monkeypatch, ws):
    from smviz.analysis import diff_run_steps

    at = ok(page(monkeypatch, ws, "Diff").run())
    at.selectbox(key="run").set_value("sparse").run()
    at.radio(key="mode").set_value("Two steps").run()
    at.number_input(key="step_a").set_value(2).run()
    at.number_input(key="step_b").set_value(4).run()
    ok(at)
    want = diff_run_steps(ws.run("sparse"), ws.model("micro"), 2, 4)
    assert any("step 2 → step 4" in s.value for s in at.subheader)
    slots = table(at, "delta_norm", "allowed")
    assert sorted(slots["slot"]) == sorted(want.slots["slot"]) and slots["allowed"].all()
    assert {m.label: m.value for m in at.metric}["Audit violations"] == "0"
    assert len(table(at, "parameter", "violation")) == len(want.audit)
    assert "Mean Jaccard" in texts(at.markdown)
    deltas = table(at, "f1_before", "delta_f1")
    from smviz.analysis import Run

    steps = Run(ws.run("sparse")).steps
    assert set(deltas["fact_id"]) == set(steps[(steps["step"] > 2) & (steps["step"] <= 4)]["fact_id"])


def test_diff_page_full_checkpoint(monkeypatch, ws):
    at = ok(page(monkeypatch, ws, "Diff").run())
    at.selectbox(key="run").set_value("full").run()
    ok(at)
    assert at.radio(key="mode").options == ["Base → final checkpoint"]
    assert {m.label: m.value for m in at.metric}["Audit violations"] == "0"
    assert any("micro → full/model" in s.value for s in at.subheader)


# ---------------------------------------------------------------- the command line


def test_app_command(tmp_path, capsys):
    """The command `smviz app` runs, and its refusal of a missing workspace (serving it for real, the
    host warning and the signals: test_serve.py)."""
    import sys

    from smviz import cli
    from smviz.serve import app_command

    cmd = app_command(8600, "127.0.0.1")
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == str(APP / "Home.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false" and cmd[cmd.index("--server.headless") + 1] == "true"
    assert cli.main(["app", "--workspace", str(tmp_path / "nope")]) != 0
    assert "does not exist" in capsys.readouterr().err
