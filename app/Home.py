"""smviz app — Overview: the workspace's models, traces and runs, and a memory-usage summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402

st.set_page_config(page_title="smviz — Overview", layout="wide")
st.title("smviz — Overview")
ws = c.workspace()
st.caption(f"Workspace: {ws.root}")

model_names, trace_names, run_names = c.models(ws), c.traces(ws), c.runs(ws)
missing = False

st.subheader("Models")
if model_names:
    rows = []
    for name in model_names:
        stats = c.load_stats(str(ws.model(name)))
        rows.append({"model": name, "model_hash": c.model_hashes(str(ws.root)).get(name), "background stats": stats is not None})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="models_table")
    for name in model_names:
        if c.load_stats(str(ws.model(name))) is None:
            st.warning(f"Model {name} has no background statistics (needed for TF-IDF and sparse finetuning). Make them with:")
            st.code(c.cmd_stats(ws, name), language="bash")
else:
    missing = True
    st.warning("No models yet. Build the default workspace (world, tokenizer, pretrained model) with:")
    st.code(c.cmd_model(ws), language="bash")

st.subheader("Traces")
if trace_names:
    rows = []
    for name in trace_names:
        trace, _ = c.load_trace(str(ws.trace(name)))
        rows.append({"trace": name, "documents": trace.n_docs, "tokens": trace.n_tokens, "accesses": trace.n_accesses,
                     "layers": ", ".join(map(str, trace.layers)), "model_hash": trace.model_hash,
                     "source": trace.meta.get("source", {}).get("name", "")})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="traces_table")
else:
    missing = True
    st.warning("No traces yet: the Slot, Fact and Entities pages need one. Record one with:")
    st.code(c.cmd_record(ws, c.first_model(ws)), language="bash")

st.subheader("Runs")
if run_names:
    rows = []
    for name in run_names:
        run = c.load_run(str(ws.run(name)))
        s = run.summary or {}
        rows.append({"run": name, "method": run.method, "stream": run.stream, "finished": run.summary is not None, "steps": s.get("steps"),
                     "items": s.get("facts"), "top_t": run.config.get("top_t"), "base model": c.base_model(ws, run.base_model_hash) or run.base_model_hash})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="runs_table")
else:
    missing = True
    st.warning("No finetuning runs yet: the Steps and Diff pages need one. Start one with:")
    st.code(c.cmd_finetune(ws, c.first_model(ws)), language="bash")

st.subheader("Memory usage")
sources = [f"trace: {n}" for n in trace_names] + [f"background stats: {n}" for n in model_names if c.load_stats(str(ws.model(n))) is not None]
if not sources:
    st.info("No trace or background statistics to summarise yet.")
else:
    source = st.selectbox("Usage of", sources, key="usage_source")
    kind, name = source.split(": ", 1)
    if kind == "trace":
        trace, _ = c.load_trace(str(ws.trace(name)))
        layer = st.selectbox("Memory layer", trace.layers, key="usage_layer")
        usage, counts = trace.usage(layer), trace.slot_counts(layer)
    else:
        stats = c.load_stats(str(ws.model(name)))
        layer = st.selectbox("Memory layer", list(stats.layers), key="usage_layer")
        usage = stats.usage(layer)
        counts = stats.counts[stats.layer_index(layer)].numpy()
    cols = st.columns(4)
    cols[0].metric("Used share", f"{usage['used_share']:.1%}")
    cols[1].metric("Dead slots", f"{int(usage['dead']):,} / {int(usage['slots']):,}")
    cols[2].metric("Gini", f"{usage['gini']:.3f}")
    cols[3].metric("Accesses", f"{int(usage['accesses']):,}")
    st.dataframe(pd.DataFrame([usage]), hide_index=True, key="usage_table")
    st.plotly_chart(figures.access_histogram(counts, title=f"Reads per slot — {source}, layer {layer}"), key="usage_hist")
