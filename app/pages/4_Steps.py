"""smviz app — Steps: learning and forgetting curves of the runs (every measured metric: learning,
known facts, held-out NLL, each named forgetting probe, the editing metrics of editing streams) with
their table, and how the selected slots overlap, get reused and churn across the steps and facts of a run."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.analysis import churn, jaccard_matrix, selected_sets, slot_reuse  # noqa: E402

st.set_page_config(page_title="smviz — Steps", layout="wide")
st.title("Steps")
ws = c.workspace()
run_names = c.runs(ws)
c.require(run_names, "finetuning runs", c.cmd_finetune(ws, c.first_model(ws)))

st.subheader("Learning and forgetting")
frames = []
for name in run_names:
    m = c.load_run(str(ws.run(name))).metrics
    if len(m):
        frames.append(m.assign(run=f"{name} ({c.load_run(str(ws.run(name))).method})"))
if frames:
    metrics = pd.concat(frames, ignore_index=True)  # a metric one run did not measure: NaN in its rows
    metrics = metrics[["run", *(col for col in metrics.columns if col != "run")]]
    st.plotly_chart(figures.learning_curves(metrics, by="run"), key="curves_fig")
    st.dataframe(metrics, hide_index=True, key="metrics_table")

selecting = [r for r in run_names if c.selects(c.load_run(str(ws.run(r))))]
st.subheader("Selected slots across steps and facts")
if not selecting:
    st.info("No run selects slots (sparse finetuning does). Start one with:")
    st.code(c.cmd_finetune(ws, c.first_model(ws)), language="bash")
    st.stop()
run_name = st.selectbox("Run", selecting, key="run")
run = c.load_run(str(ws.run(run_name)))
trace = next((t for t in c.traces(ws) if c.load_trace(str(ws.trace(t)))[0].model_hash == run.base_model_hash), None)
by = st.radio("Overlap by", ["step", "fact"], horizontal=True, key="by")
matrix = jaccard_matrix(selected_sets(run, by=by))
st.plotly_chart(figures.overlap_heatmap(matrix, title=f"Jaccard overlap of selected sets by {by} — {run_name}"), key="overlap_fig")
st.dataframe(matrix.round(3), key="overlap_table")

st.subheader("Reuse")
reuse, config = c.with_links(slot_reuse(run), trace)
st.dataframe(reuse, hide_index=True, column_config=config, key="reuse_table")
st.subheader("Churn")
ch = churn(run)
st.plotly_chart(figures.churn_figure(ch), key="churn_fig")
st.dataframe(ch, hide_index=True, key="churn_table")
