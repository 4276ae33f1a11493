"""The Overview page (app/Home.py) under AppTest on a micro workspace built once per module (two runs,
a trace of the new facts, and a run and a trace with hostile names): every number it shows is the
library's — learning against forgetting of each run, memory health of each model, the entry lists'
slots (TF-IDF, ‖ΔV‖, entity q-value) and their links to the Slot page — its first load reads metadata
only, and an empty workspace shows the commands that make the missing pieces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest import ok, table  # noqa: E402

HOME = Path(__file__).resolve().parents[1] / "app" / "Home.py"
XSS = "<script>alert(1)"  # no "/" in a directory name
RUN_XSS = f"{XSS} run"
TRACE_XSS = f"{XSS} trace"
TOP = 15  # _common.HOME_TOP


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    ws = build_micro_workspace(tmp_path_factory.mktemp("home") / "ws", stats_batches=8)
    shutil.copytree(ws.run("sparse"), ws.run(RUN_XSS))  # the same run under a hostile name
    shutil.copytree(ws.trace("new"), ws.trace(TRACE_XSS))
    return ws


def home(monkeypatch, root) -> AppTest:
    monkeypatch.setenv("SMVIZ_WORKSPACE", str(root))
    return AppTest.from_file(str(HOME), default_timeout=120)


def chart(at: AppTest, key: str) -> dict:
    return json.loads(next(ch for ch in at.get("plotly_chart") if ch.key == key).proto.spec)


def shown_text(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "warning", "info", "error", "code")
                     for e in getattr(at, kind))


def slot_links(df, trace: str) -> None:
    from urllib.parse import quote

    assert df["open"].tolist() == [f"/Slot?trace={quote(trace, safe='')}&slot={int(s)}" for s in df["slot"]]


# ---------------------------------------------------------------- the first load


def test_first_load_reads_metadata_only(monkeypatch, ws):
    """No model weights hashed, no trace verified or indexed, no model loaded, no diff, no spaCy."""
    import streamlit as st

    import smviz.model.format as model_format
    import smviz.trace.trace as trace_module
    from smviz.model import MemoryModel
    from smviz.trace import SlotIndex

    st.cache_data.clear()
    st.cache_resource.clear()
    weights = {p.resolve() for p in ws.models_dir.glob("*/*.safetensors")}
    hashed = []
    real_sha = model_format.sha256_file
    monkeypatch.setattr(model_format, "sha256_file", lambda p: hashed.append(Path(p).resolve()) or real_sha(p))
    monkeypatch.setattr(trace_module, "file_digest", lambda *a: pytest.fail("a trace shard was hashed"))
    monkeypatch.setattr(SlotIndex, "for_trace", classmethod(lambda *a, **k: pytest.fail("a slot index was built")))
    monkeypatch.setattr(MemoryModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    at = ok(home(monkeypatch, ws.root).run())
    assert not weights & set(hashed)
    assert table(at, "open", "rank", "score")["slot"].size  # the TF-IDF list is there on the first load


def test_home_shows_each_part(monkeypatch, ws):
    at = ok(home(monkeypatch, ws.root).run())
    subheaders = [h.value for h in at.subheader]
    assert subheaders == ["Learning against forgetting", "Memory health", "Slots to open", "Workspace"]
    assert table(at, "model", "background stats")["model"].tolist() == ["micro"]
    assert sorted(table(at, "trace", "accesses")["trace"]) == sorted(["new", TRACE_XSS])
    runs = table(at, "run", "method").set_index("run")
    assert sorted(runs.index) == sorted(["full", "sparse", RUN_XSS]) and runs["finished"].all()


# ---------------------------------------------------------------- learning against forgetting


def test_runs_scatter_one_point_per_run_with_the_library_values(monkeypatch, ws):
    import html

    from smviz.analysis import Run

    at = ok(home(monkeypatch, ws.root).run())
    spec = chart(at, "runs_scatter")
    points = {html.unescape(t): (x, y, trace["name"]) for trace in spec["data"] for t, x, y in zip(trace["text"], trace["x"], trace["y"])}
    expected = {}
    for name in ("full", "sparse", RUN_XSS):
        run = Run(ws.run(name))
        m = run.summary["metrics"]
        expected[name] = (m["known_em"]["start"] - m["known_em"]["end"], m["learning_em"]["end"], run.method)
    assert points.keys() == expected.keys() and sum(len(t["x"]) for t in spec["data"]) == len(expected)
    for name, (x, y, method) in expected.items():
        assert points[name][0] == pytest.approx(x) and points[name][1] == pytest.approx(y) and points[name][2] == method
    hover = [h for trace in spec["data"] for h in trace["hovertext"]]
    assert any("top_t: 16" in h and "lr: " in h for h in hover)  # the run's config on hover
    runs = table(at, "run", "learning EM").set_index("run")
    m = Run(ws.run("sparse")).summary["metrics"]
    assert runs.loc["sparse", "learning EM"] == pytest.approx(m["learning_em"]["end"])
    assert runs.loc["sparse", "known EM start"] == pytest.approx(m["known_em"]["start"])


# ---------------------------------------------------------------- memory health


def test_memory_health_is_the_library_usage(monkeypatch, ws):
    from smviz.stats import SlotStats
    from smviz.trace import Trace

    at = ok(home(monkeypatch, ws.root).run())
    stats = SlotStats.load_for_model(ws.model("micro"))
    health = table(at, "model", "layer", "Gini")
    assert health["layer"].tolist() == list(stats.layers)
    for row in health.to_dict("records"):
        usage = stats.usage(row["layer"])
        assert row["used share"] == pytest.approx(usage["used_share"]) and row["dead slots"] == usage["dead"]
        assert row["Gini"] == pytest.approx(usage["gini"]) and row["reads"] == usage["accesses"]
    # the default source is the first model's background (no trace read); then a trace
    assert at.selectbox(key="usage_source").value == "background stats: micro"
    metrics = {m.label: m.value for m in at.metric}
    usage = stats.usage(stats.layers[0])
    assert metrics["Gini"] == f"{usage['gini']:.3f}" and metrics["Dead slots"] == f"{int(usage['dead']):,} / {int(usage['slots']):,}"
    hist = chart(at, "usage_hist")
    assert sum(sum(t["y"]) for t in hist["data"]) == stats.n_slots and hist["data"][0]["y"] == [usage["dead"]]
    at.selectbox(key="usage_source").set_value("trace: new").run()
    ok(at)
    trace = Trace.load(ws.trace("new"))
    usage = trace.usage(trace.layers[0])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Gini"] == f"{usage['gini']:.3f}" and metrics["Accesses"] == f"{int(usage['accesses']):,}"
    assert table(at, "used_share")["used_share"].iloc[0] == pytest.approx(usage["used_share"])
    assert sum(chart(at, "usage_hist")["data"][1]["y"]) == int((trace.slot_counts(trace.layers[0]) > 0).sum())


# ---------------------------------------------------------------- slots to open


def test_tfidf_list_is_the_library_ranking(monkeypatch, ws):
    from smviz.analysis import tfidf_table, trace_slot_counts
    from smviz.stats import SlotStats
    from smviz.trace import Trace

    at = ok(home(monkeypatch, ws.root).run())
    assert at.selectbox(key="home_tfidf_trace").options == sorted(["new", TRACE_XSS])
    at.selectbox(key="home_tfidf_trace").set_value("new").run()
    shown = table(ok(at), "open", "rank", "score")
    trace, stats = Trace.load(ws.trace("new")), SlotStats.load_for_model(ws.model("micro"))
    layer = trace.layers[0]
    expected = tfidf_table(trace_slot_counts(trace, layer=layer), stats, layer).head(TOP)
    assert shown["slot"].tolist() == expected["slot"].tolist()
    np.testing.assert_allclose(shown["score"], expected["score"])
    assert shown["reads"].tolist() == expected["count"].tolist() and shown["df"].tolist() == expected["df"].tolist()
    slot_links(shown, "new")
    at.selectbox(key="home_tfidf_trace").set_value(TRACE_XSS).run()
    slot_links(table(ok(at), "open", "rank", "score"), TRACE_XSS)


@pytest.mark.parametrize("name", ["sparse", "full"])
def test_delta_list_is_the_library_diff(monkeypatch, ws, name):
    from smviz.analysis import diff_run_model

    at = ok(home(monkeypatch, ws.root).run())
    assert at.selectbox(key="home_delta_run").value is None  # nothing loaded until a run is chosen
    assert not any("delta_norm" in d.value.columns for d in at.dataframe)
    at.selectbox(key="home_delta_run").set_value(name).run()
    shown = table(ok(at), "open", "delta_norm")
    slots = diff_run_model(ws.run(name), ws.model("micro")).slots
    expected = slots[slots["layer"] == slots["layer"].min()].head(TOP)
    assert shown["slot"].tolist() == expected["slot"].tolist()
    np.testing.assert_allclose(shown["delta_norm"], expected["delta_norm"])
    slot_links(shown, sorted(["new", TRACE_XSS])[0])  # the first trace recorded with the run's base model


def test_entity_list_is_the_library_profile(monkeypatch, ws):
    import _common as c  # the app's module, as the page imported it: its cached entity profile

    at = ok(home(monkeypatch, ws.root).run())
    assert at.selectbox(key="home_entity_trace").value is None  # spaCy runs only when asked
    at.selectbox(key="home_entity_trace").set_value("new").run()
    shown = table(ok(at), "open", "q_value")
    _, _, profile = c.load_entities(str(ws.trace("new")), str(ws.data))  # slot_entity_profile of the trace (spaCy once)
    assert {"q_value", "log_odds"} <= set(profile.columns) and len(profile) > TOP
    expected = profile.sort_values(["q_value", "log_odds", "slot"], ascending=[True, False, True], kind="stable").head(TOP)
    assert shown["slot"].tolist() == expected["slot"].tolist()
    np.testing.assert_allclose(shown["q_value"], expected["q_value"])
    slot_links(shown, "new")


# ---------------------------------------------------------------- hostile names, empty workspace


def test_hostile_names_stay_text(monkeypatch, ws):
    at = ok(home(monkeypatch, ws.root).run())
    spec = chart(at, "runs_scatter")
    drawn = json.dumps([[t.get("name"), t.get("text"), t.get("hovertext")] for t in spec["data"]])
    assert "<script" not in drawn and "&lt;script&gt;alert(1)" in drawn
    at.selectbox(key="home_delta_run").set_value(RUN_XSS).run()
    ok(at)
    assert "<script" not in shown_text(at)  # names in markdown are escaped (c.md)
    assert table(at, "run", "method")["run"].tolist().count(RUN_XSS) == 1  # a table cell: text, as it is


def test_empty_workspace_shows_the_commands(monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    at = ok(home(monkeypatch, tmp_path / "empty").run())
    shown = "\n".join(str(w.value) for w in at.warning)
    assert "No models" in shown and "No traces" in shown and "No finetuning runs" in shown
    code = "\n".join(str(x.value) for x in at.code)
    assert "smviz demo --workspace" in code and "smviz record --model" in code and "smviz finetune" in code
    assert not at.get("plotly_chart")


# ---------------------------------------------------------------- the two figures


def test_slot_reads_histogram_is_binned():
    from smviz import figures

    counts = np.random.default_rng(0).poisson(3, size=1_000_000)  # a memory of a million slots: ~41 bars
    fig = figures.slot_reads_histogram(counts, bins=40)
    dead, read = fig.data
    assert list(dead.y) == [int((counts == 0).sum())] and sum(read.y) == int((counts > 0).sum()) and len(read.y) <= 40
    assert len(fig.to_json()) < 20_000
    empty = figures.slot_reads_histogram(np.zeros(16, dtype=np.int64))
    assert len(empty.data) == 1 and list(empty.data[0].y) == [16]


def test_learning_forgetting_figure_escapes_and_skips_unmeasured():
    import pandas as pd

    from smviz import figures

    runs = pd.DataFrame({"run": ["a", "<b>x</b>", "edits"], "method": ["sparse", "full", "sparse"],
                         "known EM drop": [0.1, 0.4, None], "learning EM": [0.5, 0.9, None],
                         "config": [{"top_t": 8}, {"lr": "<i>"}, {}]})
    fig = figures.learning_forgetting_figure(runs)
    assert sorted(t.name for t in fig.data) == ["full", "sparse"] and sum(len(t.x) for t in fig.data) == 2
    full = next(t for t in fig.data if t.name == "full")
    assert list(full.x) == [0.4] and list(full.y) == [0.9] and list(full.text) == ["&lt;b&gt;x&lt;/b&gt;"]
    assert "&lt;i&gt;" in full.hovertext[0] and "<i>" not in full.hovertext[0]
