"""smviz app — Diff: two steps of a value-row run, or a run's final checkpoint against its base model:
changed slots, the audit of frozen parameters, access shift (on the facts' held-out questions, as the
diff report: `smviz.analysis.question_access_shift`) and per-fact metric deltas."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.analysis import diff_run_model, diff_run_steps, fact_shift, question_access_shift  # noqa: E402

st.set_page_config(page_title="smviz — Diff", layout="wide")
st.title("Diff")
ws = c.workspace()
run_names = c.runs(ws)
c.require(run_names, "finetuning runs", c.cmd_finetune(ws, c.first_model(ws)))
run_name = st.selectbox("Run", run_names, key="run")
run = c.load_run(str(ws.run(run_name)))
base = c.base_model(ws, run.base_model_hash)
if base is None:
    st.error(f"Run {run_name} started from model {run.base_model_hash}, which is not in {ws.root / 'models'}.")
    st.stop()
base_dir = str(ws.model(base))
modes = (["Two steps"] if run.has_deltas else []) + ["Base → final checkpoint"]
mode = st.radio("Compare", modes, horizontal=True, key="mode")
n_steps = int(run.steps["step"].max())


@st.cache_resource(show_spinner="Rebuilding the memory at that step…")
def at_step(run_path: str, model_dir: str, step: int):
    from smviz.model import MemoryModel

    return c.load_run(run_path).rebuild(MemoryModel.from_pretrained(model_dir), step)


@st.cache_data(show_spinner="Diffing…")
def diff(run_path: str, model_dir: str, mode: str, a: int, b: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    d = diff_run_steps(run_path, model_dir, a, b) if mode == "Two steps" else diff_run_model(run_path, model_dir)
    return d.slots, d.audit


if mode == "Two steps":
    cols = st.columns(2)
    a = int(cols[0].number_input("Step A", min_value=0, max_value=n_steps - 1, value=0, key="step_a"))
    b = int(cols[1].number_input("Step B", min_value=1, max_value=n_steps, value=n_steps, key="step_b"))
    if not a < b:
        st.error(f"Step A ({a}) must come before step B ({b}).")
        st.stop()
    before, after = at_step(str(ws.run(run_name)), base_dir, a), at_step(str(ws.run(run_name)), base_dir, b)
    fact_ids = list(dict.fromkeys(run.steps[(run.steps["step"] > a) & (run.steps["step"] <= b)]["fact_id"]))
    label = f"step {a} → step {b}"
else:
    a, b = 0, n_steps
    if not run.model_dir.is_dir():
        st.warning(f"Run {run_name} has no final model yet; finish it by running the same `smviz finetune` command again.")
        st.stop()
    before, after = c.load_model(base_dir), c.load_model(str(run.model_dir))
    fact_ids = list(dict.fromkeys(run.steps["fact_id"]))
    label = f"{base} → {run_name}/model"

slots, audit = diff(str(ws.run(run_name)), base_dir, mode, a, b)
st.subheader(f"Changed slots ({label})")
violations = int(audit["violation"].sum())
cols = st.columns(3)
cols[0].metric("Changed value rows", f"{len(slots):,}")
cols[1].metric("Parameters changed", f"{int((~audit['bit_identical']).sum())} / {len(audit)}")
cols[2].metric("Audit violations", f"{violations}")
trace = next((t for t in c.traces(ws) if c.load_trace(str(ws.trace(t)))[0].model_hash == run.base_model_hash), None)
shown, config = c.with_links(slots, trace)
st.dataframe(shown, hide_index=True, column_config=config, key="slots_table")
st.subheader("Audit of frozen parameters")
if violations:
    st.error(f"{violations} parameters changed that {run.method} may not change.")
else:
    st.success("Every parameter outside what the method may change is bit-identical.")
st.dataframe(audit, hide_index=True, key="audit_table")

facts = c.load_facts(str(ws.data))
chosen = [facts[f] for f in fact_ids if f in facts]
st.subheader("Access shift")
if chosen:
    shift = question_access_shift(before, after, chosen)
    st.write(f"Mean Jaccard of each token's slots over {len(shift)} probe tokens: {shift['jaccard'].mean():.3f} "
             f"({shift.attrs['protocol']})")
    st.plotly_chart(figures.access_shift_figure(shift), key="shift_fig")
    st.subheader("Per-fact metric deltas")
    fs = fact_shift(before, after, chosen)
    per = fs.groupby("fact_id", sort=False)[["f1_before", "f1_after", "delta_f1", "em_before", "em_after"]].mean().reset_index()
    st.dataframe(per, hide_index=True, key="fact_delta_table")
    st.plotly_chart(figures.fact_shift_figure(fs), key="fact_shift_fig")
else:
    st.info("None of the facts trained between these points is in data/facts-*.jsonl.")
