"""smviz app — Fact: one item of a stream. A fact: its texts, the slots its tokens read, what training
selected for it, and what it learned. An item of another kind of data (an editing record, a QA item, a
document; from a run's stream.jsonl): its fields as plain text, its training steps, the slots they
selected and, for an edit, its editing scores before and after."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.data.edits import EditRecord  # noqa: E402
from smviz.data.facts import parse_fact_doc_id  # noqa: E402
from smviz.errors import RunError  # noqa: E402
from smviz.train.rundir import FinetuneRunDir  # noqa: E402
from smviz.workspace.layout import DATA_DIR, FACTS_GLOB  # noqa: E402

st.set_page_config(page_title="smviz — Fact", layout="wide")
st.title("Fact")
ws = c.workspace()
facts = c.load_facts(str(ws.data)) if ws.data.is_dir() else {}
sources = c.item_sources(ws, facts)
c.require(list(sources), f"facts ({DATA_DIR}/{FACTS_GLOB}) or runs on other data", f"smviz world --out {ws.data}")
source = st.selectbox("Items of", list(sources), format_func=sources.get, key="source")
source_run = None if source == c.WORKSPACE_FACTS else source.removeprefix("run:")

trace_names = c.traces(ws)
if "trace" not in st.session_state and st.query_params.get("trace") in trace_names:  # ?trace=NAME (the Search page links)
    st.session_state["trace"] = st.query_params.get("trace")
trace_name = st.selectbox("Trace", trace_names, key="trace") if trace_names else None


def show_selected(run_name: str, item_id: str) -> None:
    """The slots the steps of `item_id` selected in run `run_name`, linked to the Slot page."""
    hist = c.step_history(str(ws.run(run_name)))
    sel = hist[hist["fact_id"] == item_id][["step", "layer", "rank", "slot", "score", "tf", "df"]]
    st.text(f"Slots selected at the {sel['step'].nunique()} steps of {item_id} in run {run_name}:")
    shown, config = c.with_links(sel, trace_name)
    st.dataframe(shown, hide_index=True, column_config=config, key="selected_table")


def show_item(kind: str, item: dict[str, Any]) -> None:
    """A stream item's fields, every user text as plain text (st.text, dataframes), never markup."""
    st.subheader({"edits": "Edit record", "qa": "Question", "documents": "Document"}[kind])
    st.text(f"id: {item['id']}")
    if kind == "edits":
        record = EditRecord.from_dict(item)
        st.text(f"subject: {record.subject}")
        st.text(f"rewrite: {record.rewrite_prompt}")
        st.text(f"edit: {record.target_true} → {record.target_new}")
        st.text(f"source: {record.source}")
        st.dataframe(pd.DataFrame({"paraphrase prompt": list(record.paraphrase_prompts)}), hide_index=True, key="paraphrase_table")
        st.dataframe(pd.DataFrame(list(record.neighborhood), columns=["neighborhood prompt", "answer"]), hide_index=True,
                     key="neighborhood_table")
    elif kind == "qa":
        st.text(f"question: {item['question']}")
        st.dataframe(pd.DataFrame({"answer": item["answers"]}), hide_index=True, key="answers_list")
    else:
        st.text(item["text"])


if source_run is not None and c.load_run(str(ws.run(source_run))).stream != "facts":
    run = c.load_run(str(ws.run(source_run)))
    items = {d["id"]: d for d in run.items}
    item_id = st.selectbox("Item", list(items), key="item")
    show_item(run.stream, items[item_id])
    st.subheader("Training")
    try:
        steps = run.steps
    except RunError:  # before the run's first evaluation
        st.info(f"Run {source_run} has no steps.parquet yet: no training steps to show.")
        st.stop()
    mine = steps[steps["fact_id"] == item_id]
    st.dataframe(mine[["step", "layer", "loss", "accessed", "grad_norm"]].assign(selected=mine["selected"].map(len)),
                 hide_index=True, key="item_steps_table")
    if c.selects(run):
        show_selected(source_run, item_id)
    base = c.base_model(ws, run.base_model_hash)
    if run.stream == "edits" and base is not None and run.model_dir.is_dir():
        from smviz.evaluate import edit_scores

        @st.cache_data(show_spinner="Scoring the edit…")
        def scores(before: str, after: str, item_id: str, prompt_format: str) -> pd.DataFrame:
            record = [EditRecord.from_dict(items[item_id])]
            return pd.DataFrame([{"model": name, **edit_scores(c.load_model(path), record, prompt_format=prompt_format)[0]}
                                 for name, path in (("before", before), ("after", after))])

        st.subheader("Editing scores before and after")
        prompt_format = run.identity["stream"].get("prompt_format", "completion")
        st.dataframe(scores(str(ws.model(base)), str(run.model_dir), item_id, prompt_format), hide_index=True, key="edit_scores_table")
    st.stop()

if source_run is not None:
    facts = c.load_run_facts(str(ws.run(source_run)))
trace = index = None
if trace_name is not None:
    trace, index = c.load_trace(str(ws.trace(trace_name)))
    fact_docs = {d: p for d in trace.tokens.column("doc_id").unique().to_pylist() if (p := parse_fact_doc_id(d)) is not None}
    in_trace = sorted({p.fact_id for p in fact_docs.values()} & set(facts))
else:
    fact_docs, in_trace = {}, []
choices = in_trace or sorted(facts)
if "fact" not in st.session_state and st.query_params.get("fact") in choices:  # ?fact=ID preselects the fact
    st.session_state["fact"] = st.query_params.get("fact")
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
    elif trace.summary_only:
        st.info(c.summary_only_note(trace_name, "Which slots each token read"))
    else:
        doc = st.selectbox("Paraphrase or question", mine, key="doc")
        reads = index.slots_for(doc, 0, 1 << 30)
        st.plotly_chart(figures.token_slot_heatmap(reads), key="token_slot_fig")
        per_token = (reads.groupby(["position", "token"], sort=True)
                     .apply(lambda g: ", ".join(str(s) for s in g.sort_values("weight", ascending=False)["slot"].unique()[:8]), include_groups=False)
                     .rename("slots (strongest first)").reset_index())
        st.dataframe(per_token, hide_index=True, key="token_slots")

run_names = [r for r in c.runs(ws) if (run := c.load_run(str(ws.run(r)))).stream == "facts" and fact_id in set(run.steps["fact_id"])]
run_names.sort(key=lambda r: (not c.selects(c.load_run(str(ws.run(r)))), r))  # selecting runs first
st.subheader("Training")
if not run_names:
    st.info(f"No run has trained {fact_id} yet. Start one with:")
    st.code(c.cmd_finetune(ws, c.first_model(ws)), language="bash")
    st.stop()
run_name = st.selectbox("Run", run_names, key="run")
run = c.load_run(str(ws.run(run_name)))
if c.selects(run):
    show_selected(run_name, fact_id)
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
def shift(before: str, after: str, source: str, fact_id: str) -> pd.DataFrame:
    with c.live_model(before) as model_before, c.live_model(after) as model_after:
        return fact_shift(model_before, model_after, [facts[fact_id]])


st.dataframe(shift(str(ws.model(base)), str(after_dir), source, fact_id), hide_index=True, key="answers_table")

if c.selects(run) and st.button("Run ablation test", key="ablate"):
    slots = run.selected(by="fact")[fact_id]
    with c.live_model(str(after_dir)) as model:
        res = ablation_test(model, fact, slots, draws=5)
    real = res[res["set"] == "real"].iloc[0]
    st.write(f"Ablating the {len(slots)} selected slots: Δlog-prob {real['delta_logprob']:.4f}, ΔF1 {real['delta_f1']:.3f}, "
             f"percentile {real['percentile']:.2f} among {len(res) - 1} random sets.")
    st.dataframe(res, hide_index=True, key="ablation_table")
