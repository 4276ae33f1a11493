"""smviz app — Fact: one fact's texts, the slots its tokens read, what training selected for it, and
what it learned."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.data.facts import parse_fact_doc_id  # noqa: E402
from smviz.train.rundir import FinetuneRunDir  # noqa: E402
from smviz.workspace.layout import DATA_DIR, FACTS_GLOB  # noqa: E402

st.set_page_config(page_title="smviz — Fact", layout="wide")
st.title("Fact")
ws = c.workspace()
facts = c.load_facts(str(ws.data)) if ws.data.is_dir() else {}
c.require(list(facts), f"facts ({DATA_DIR}/{FACTS_GLOB})", f"smviz world --out {ws.data}")

trace_names = c.traces(ws)
trace_name = st.selectbox("Trace", trace_names, key="trace") if trace_names else None
trace = index = None
if trace_name is not None:
    trace, index = c.load_trace(str(ws.trace(trace_name)))
    fact_docs = {d: p for d in trace.tokens.column("doc_id").unique().to_pylist() if (p := parse_fact_doc_id(d)) is not None}
    in_trace = sorted({p.fact_id for p in fact_docs.values()} & set(facts))
else:
    fact_docs, in_trace = {}, []
choices = in_trace or sorted(facts)
fact_id = st.selectbox("Fact", choices, key="fact")
fact = facts[fact_id]

st.subheader(f"Fact {fact_id}")
st.text(f"{fact.subject} — {fact.relation} — {fact.answer}")
st.dataframe(pd.DataFrame({"statement": list(fact.statements)}), hide_index=True)
st.dataframe(pd.DataFrame([{"question": q.text, "template": q.template, "heldout": q.heldout} for q in fact.questions]), hide_index=True)

st.subheader("Token × slot reads")
if trace is None:
    st.warning("No traces yet. Record the facts with:")
    st.code(c.cmd_record(ws, c.first_model(ws)), language="bash")
else:
    mine = [d for d, p in fact_docs.items() if p.fact_id == fact_id]
    if not mine:
        st.info(f"Trace {trace_name} holds no documents of {fact_id}; record the facts file to see them.")
    else:
        doc = st.selectbox("Paraphrase or question", mine, key="doc")
        reads = index.slots_for(doc, 0, 1 << 30)
        st.plotly_chart(figures.token_slot_heatmap(reads), key="token_slot_fig")
        per_token = (reads.groupby(["position", "token"], sort=True)
                     .apply(lambda g: ", ".join(str(s) for s in g.sort_values("weight", ascending=False)["slot"].unique()[:8]), include_groups=False)
                     .rename("slots (strongest first)").reset_index())
        st.dataframe(per_token, hide_index=True, key="token_slots")

run_names = [r for r in c.runs(ws) if fact_id in set(c.load_run(str(ws.run(r))).steps["fact_id"])] if c.runs(ws) else []
run_names.sort(key=lambda r: (not c.selects(c.load_run(str(ws.run(r)))), r))  # selecting runs first
st.subheader("Training")
if not run_names:
    st.info(f"No run has trained {fact_id} yet. Start one with:")
    st.code(c.cmd_finetune(ws, c.first_model(ws)), language="bash")
    st.stop()
run_name = st.selectbox("Run", run_names, key="run")
run = c.load_run(str(ws.run(run_name)))
if c.selects(run):
    hist = c.step_history(str(ws.run(run_name)))
    sel = hist[hist["fact_id"] == fact_id][["step", "layer", "rank", "slot", "score", "tf", "df"]]
    st.write(f"Slots selected at the {sel['step'].nunique()} steps of {fact_id} in run {run_name}:")
    shown, config = c.with_links(sel, trace_name)
    st.dataframe(shown, hide_index=True, column_config=config, key="selected_table")
    if trace is not None and trace.model_hash == run.base_model_hash:
        from smviz.analysis import core_coverage, core_set

        core = c.as_int_list(core_set(trace, fact_id))
        st.write(f"Core set ({len(core)} slots): {', '.join(map(str, core)) or '—'}")
        st.dataframe(core_coverage(run, trace, fact_ids=[fact_id]), hide_index=True, key="coverage_table")
else:
    st.info(f"Run {run_name} ({run.method}) selects no slots: every parameter of its kind is trained.")

base = c.base_model(ws, run.base_model_hash)
after_dir = FinetuneRunDir(ws.run(run_name)).model_dir
if base is None or not after_dir.is_dir():
    st.info("Answers before/after need the run's base model in models/ and a finished run (run/model).")
    st.stop()
st.subheader("Answers before and after")
from smviz.analysis import ablation_test, fact_shift  # noqa: E402


@st.cache_data(show_spinner="Answering…")
def shift(before: str, after: str, fact_id: str) -> pd.DataFrame:
    return fact_shift(c.load_model(before), c.load_model(after), [c.load_facts(str(ws.data))[fact_id]])


st.dataframe(shift(str(ws.model(base)), str(after_dir), fact_id), hide_index=True, key="answers_table")

if c.selects(run) and st.button("Run ablation test", key="ablate"):
    slots = run.selected(by="fact")[fact_id]
    res = ablation_test(c.load_model(str(after_dir)), fact, slots, draws=5)
    real = res[res["set"] == "real"].iloc[0]
    st.write(f"Ablating the {len(slots)} selected slots: Δlog-prob {real['delta_logprob']:.4f}, ΔF1 {real['delta_f1']:.3f}, "
             f"percentile {real['percentile']:.2f} among {len(res) - 1} random sets.")
    st.dataframe(res, hide_index=True, key="ablation_table")
