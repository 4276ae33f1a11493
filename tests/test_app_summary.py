"""The app on a summary-only trace (issue 19): every page opens; the Slot page shows the card from the summary (the same
reads, reading tokens, mean and max weight as the trace recorded in full), the top contexts and the
uniform sample, and says what it cannot show instead of failing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest import ok, table  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "app"
sys.path.insert(0, str(APP))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    from smviz.model import MemoryModel
    from smviz.record import read_documents, record_texts

    ws = build_micro_workspace(tmp_path_factory.mktemp("summary") / "ws", stats_batches=4, trace=True, runs=(), n_new=2)
    docs, source = read_documents(ws.data / "facts-new.jsonl")
    record_texts(MemoryModel.from_pretrained(ws.model("micro")), docs, ws.trace("summ"), source=source, progress=False,
                 summary=8, summary_only=True)
    return ws


def test_the_slot_page_works_from_a_summary_only_trace(monkeypatch, ws):
    from smviz.analysis import slot_card
    from smviz.trace import Trace

    full, summ = Trace.load(ws.trace("new")), Trace.load(ws.trace("summ"))
    monkeypatch.setenv("SMVIZ_WORKSPACE", str(ws.root))
    at = AppTest.from_file(str(APP / "pages" / "1_Slot.py"), default_timeout=120)
    at.query_params["trace"] = "summ"
    ok(at.run())
    slot = at.number_input(key="slot").value
    assert slot == int(np.argmax(summ.slot_counts())) and np.array_equal(summ.slot_counts(), full.slot_counts())
    reference = slot_card(full.slot_index(), slot)  # the full trace of the same texts
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Reads in trace"] == f"{reference['reads']:,}" and metrics["Reading tokens"] == f"{reference['reading_tokens']:,}"
    assert metrics["Mean weight"] == f"{reference['mean_weight']:.3f}" and metrics["Max weight"] == f"{reference['max_weight']:.3f}"
    said = " ".join(i.value for i in at.info)
    assert "--summary-only" in said and "histograms need every read" in said and "Co-read slots need every read" in said
    columns = ["rank", "doc_id", "position", "token", "next_token", "weight", "reads", "left", "right"]
    shown = table(at, "next_token", "left", "rank")
    top = full.slot_index().contexts(slot, n=8, window=8)[columns]
    assert len(top) == 8 and shown.reset_index(drop=True).equals(top)  # the full trace's top contexts, from the summary
    assert "A uniform sample of its readers" in [s.value for s in at.subheader]


def test_every_page_opens_on_a_summary_only_trace_and_says_what_it_lacks(monkeypatch, ws):
    monkeypatch.setenv("SMVIZ_WORKSPACE", str(ws.root))
    said = {}
    for script in [APP / "Home.py", *sorted((APP / "pages").glob("*.py"))]:
        at = AppTest.from_file(str(script), default_timeout=120)
        at.query_params["trace"] = "summ"
        at.session_state["trace"] = "summ"
        ok(at.run())
        said[script.name] = " ".join(i.value for i in at.info)
    assert "needs every read" in said["3_Entities.py"] and "needs every read" in said["2_Fact.py"]
