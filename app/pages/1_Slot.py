"""smviz app — Slot: what one memory slot reads, where, how strongly, and what it does."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.train.rundir import FinetuneRunDir  # noqa: E402

st.set_page_config(page_title="smviz — Slot", layout="wide")
st.title("Slot")
ws = c.workspace()
trace_names = c.traces(ws)
c.require(trace_names, "traces", c.cmd_record(ws, c.first_model(ws)))

# query parameters ?trace=NAME&slot=N preselect the widgets on the first run of a session
qp = st.query_params
if "trace" not in st.session_state and qp.get("trace") in trace_names:
    st.session_state["trace"] = qp.get("trace")
if "slot" not in st.session_state and str(qp.get("slot", "")).isdigit():
    st.session_state["slot"] = int(qp.get("slot"))


def _pick_from_table(key: str) -> None:
    """A row selected in a table of slots becomes the slot shown."""
    state = st.session_state.get(key)
    rows = state.selection.rows if state is not None else []
    table = st.session_state.get(f"{key}__slots", [])
    if rows and rows[0] < len(table):
        st.session_state["slot"] = int(table[rows[0]])


trace_name = st.selectbox("Trace", trace_names, key="trace")
trace, index = c.load_trace(str(ws.trace(trace_name)))
layer = st.selectbox("Memory layer", trace.layers, key="layer") if len(trace.layers) > 1 else trace.layers[0]
if st.session_state.get("slot", 0) >= trace.n_slots:
    st.session_state["slot"] = 0
slot = int(st.number_input("Slot id", min_value=0, max_value=trace.n_slots - 1, step=1, key="slot"))
st.query_params["trace"], st.query_params["slot"] = trace_name, str(slot)

n_reads = index.count(slot, layer)
weights = index.slot_weights(slot, layer)
cols = st.columns(4)
cols[0].metric("Slot", f"{slot}")
cols[1].metric("Reads in trace", f"{n_reads:,}")
cols[2].metric("Mean weight", f"{weights.mean():.3f}" if n_reads else "—")
cols[3].metric("Trace", trace_name)

st.subheader(f"Top contexts of slot {slot}")
if n_reads == 0:
    st.info(f"Slot {slot} is never read in trace {trace_name} (a dead slot here).")
else:
    n = st.slider("Contexts shown", 5, 100, 20, key="n_contexts")
    ctx = index.contexts(slot, n=n, window=8, layer=layer)
    top = float(ctx["weight"].max())
    st.markdown(c.CONTEXT_CSS + "".join(c.context_html(r, top) for _, r in ctx.iterrows()), unsafe_allow_html=True)
    with st.expander("Contexts as a table"):
        st.dataframe(ctx[["rank", "doc_id", "position", "token", "weight", "reads", "left", "right"]], hide_index=True, key="contexts_table")
    st.plotly_chart(figures.weight_histogram(weights, slot=slot), key="weight_hist")

    # co-accessed slots: what else the tokens that read this slot read
    from smviz.analysis.slots import co_accessed

    co = co_accessed(index, slot, layer=layer)
    st.subheader("Co-accessed slots")
    st.caption("Slots read by the same tokens (its 200 strongest reads). Select a row to open that slot.")
    st.session_state["co_table__slots"] = co["slot"].tolist()
    st.dataframe(co, hide_index=True, key="co_table", on_select=_pick_from_table, selection_mode="single-row")

# entities
st.subheader("Entities it fires on")
if st.toggle("Label entities (spaCy)", value=False, key="entities_on"):
    _, tokens, profile = c.load_entities(str(ws.trace(trace_name)), str(ws.data))
    row = profile[profile["slot"] == slot]
    if row.empty:
        st.info(f"Slot {slot} has no reads to profile.")
    else:
        st.dataframe(row, hide_index=True, key="entity_row")
        st.plotly_chart(figures.entity_share_figure(profile, slot), key="entity_fig")
else:
    st.caption("Off by default: running the NER pipeline the first time takes a few seconds per thousand documents.")

# runs: tf-idf and selection history, value norms
run_names = [r for r in c.runs(ws) if c.load_run(str(ws.run(r))).base_model_hash == trace.model_hash and c.selects(c.load_run(str(ws.run(r))))]
st.subheader("Across the steps of a run")
if not run_names:
    st.info("No run of this trace's model selects slots yet (sparse finetuning does). Start one with:")
    st.code(c.cmd_finetune(ws, c.base_model(ws, trace.model_hash) or "NAME"), language="bash")
else:
    run_name = st.selectbox("Run", run_names, key="run")
    run = c.load_run(str(ws.run(run_name)))
    hist = c.step_history(str(ws.run(run_name)))
    steps = sorted(int(s) for s in run.steps["step"].unique())
    mine = hist[(hist["slot"] == slot) & (hist["layer"] == layer)][["step", "fact_id", "rank", "score", "tf", "df"]]
    full = pd.DataFrame({"step": steps}).merge(mine, on="step", how="left")
    full["selected"] = full["rank"].notna()
    full["score"] = full["score"].fillna(0.0)
    st.write(f"Selected in **{int(full['selected'].sum())}** of {len(steps)} steps of run {run_name} ({run.method}).")
    st.dataframe(full, hide_index=True, key="selection_history")
    st.plotly_chart(figures.tfidf_history(full, slot=slot), key="tfidf_fig")
    base = c.base_model(ws, run.base_model_hash)
    if base is not None and FinetuneRunDir(ws.run(run_name)).has_deltas():
        st.plotly_chart(figures.value_norm_history(c.value_norms(str(ws.run(run_name)), str(ws.model(base)), slot, layer), slot=slot), key="norm_fig")

# vocabulary projection
st.subheader("Promoted tokens")
base = c.base_model(ws, trace.model_hash)
if base is None:
    st.info("The model this trace was recorded with is not in the workspace's models/.")
else:
    from smviz.analysis import promoted_tokens

    @st.cache_data(show_spinner=False)
    def promoted(model_dir: str, trace_path: str, slot: int, layer: int) -> pd.DataFrame:
        tr, _ = c.load_trace(trace_path)
        return promoted_tokens(c.load_model(model_dir), slot, layer, trace=tr, k=10)

    pt = promoted(str(ws.model(base)), str(ws.trace(trace_name)), slot, layer)
    st.dataframe(pt, hide_index=True, key="promoted_table")
    st.plotly_chart(figures.promoted_tokens_figure(pt), key="promoted_fig")
