"""smviz app — Search: from a token or string, an entity label or string, or a fact to the slots that
read it, each linked to its slot page (Neuronpedia's search by token and by explanation)."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz.analysis import core_set, slot_label, token_search  # noqa: E402
from smviz.data.facts import parse_fact_doc_id  # noqa: E402
from smviz.errors import SmvizError  # noqa: E402

st.set_page_config(page_title="smviz — Search", layout="wide")
st.title("Search")
ws = c.workspace()
trace_names = c.traces(ws)
c.require(trace_names, "traces", c.cmd_record(ws, c.first_model(ws)))
qp = st.query_params  # ?trace=NAME&q=TEXT preselect the widgets on the first run of a session
if "trace" not in st.session_state and qp.get("trace") in trace_names:
    st.session_state["trace"] = qp.get("trace")
if "query" not in st.session_state and qp.get("q"):
    st.session_state["query"] = str(qp.get("q"))
cols = st.columns([2, 1, 1])
trace_name = cols[0].selectbox("Trace", trace_names, key="trace")
trace, index = c.load_trace(str(ws.trace(trace_name)))
layer = cols[1].selectbox("Memory layer", trace.layers, key="layer") if len(trace.layers) > 1 else trace.layers[0]
top = int(cols[2].number_input("Results", 1, 200, 20, key="top"))


def slots_table(df: pd.DataFrame, key: str, *, labels: bool = True) -> None:
    """Result slots, each with its label and a link to its slot page."""
    if labels and len(df):
        df = df.assign(label=[c.visible(slot_label(index, int(s), layer)) for s in df["slot"]])
    shown, config = c.with_links(df, trace_name)
    st.dataframe(shown, hide_index=True, column_config=config, key=key)


# ---------------------------------------------------------------- token or string

st.subheader("Token or string → slots")
q = st.columns([3, 1])
query = q[0].text_input("Token or string", key="query", placeholder="e.g. born, Paris")
match = q[1].radio("Match", ["exact", "substring"], horizontal=True, key="match",
                   help="exact: the token's text (stripped, any case) equals it; substring: contains it")
if query.strip():
    try:
        found = token_search(index, query, layer, match=match, top=top)
    except SmvizError as err:
        st.warning(str(err))
    else:
        st.markdown(f"{found.attrs['rows']:,} token rows {'equal' if match == 'exact' else 'contain'} "
                    f"**{c.md(query.strip())}**; the slots their reads put the most weight on:")
        slots_table(found, "token_results")

# ---------------------------------------------------------------- entity label or string

st.subheader("Entity label or string → slots")
if st.toggle("Search entities (spaCy)", value=False, key="entities_on"):
    spans, _, profile = c.load_entities(str(ws.trace(trace_name)), str(ws.data))
    labels = sorted(spans["label"].unique()) if len(spans) else []
    st.caption("Labels found: " + (", ".join(labels) or "none") + ". A label ranks slots by the share of their read mass on it; "
               "any other text finds the slots whose top entity strings contain it.")
    entity = st.text_input("Entity label or string", labels[0] if labels else "", key="entity_query")
    wanted = entity.strip()
    tops = [col for col in profile.columns if col.startswith("top") and col[3:].isdigit()]
    if not wanted:
        pass
    elif wanted.upper() in labels:
        col = f"share_{wanted.upper()}"
        hits = profile[profile["reads"] >= 2].sort_values([col, "reads"], ascending=[False, False]).head(top)
        st.markdown(f"Slots most enriched for entity label **{c.md(wanted.upper())}**:")
        slots_table(hits[["slot", "reads", col, "entity_mass_share", *tops, "q_value"]], "entity_results")
    else:
        contains = pd.concat([profile[t].astype(str).str.contains(wanted, case=False, regex=False) for t in tops], axis=1).any(axis=1)
        hits = profile[contains].sort_values(["entity_mass", "reads"], ascending=[False, False]).head(top)
        st.markdown(f"{int(contains.sum()):,} slots have an entity string containing **{c.md(wanted)}** among their top "
                    f"{len(tops)}:")
        slots_table(hits[["slot", "reads", "entity_mass", "entity_mass_share", *tops, "q_value"]], "entity_results")
else:
    st.caption("Off by default: the NER pipeline takes a few seconds per thousand documents the first time.")

# ---------------------------------------------------------------- fact

st.subheader("Fact → slots")
facts = c.load_facts(str(ws.data)) if ws.data.is_dir() else {}
in_trace = sorted({p.fact_id for d in trace.tokens.column("doc_id").unique().to_pylist() if (p := parse_fact_doc_id(d)) is not None})
if not in_trace:
    st.info(f"Trace {trace_name} holds no fact documents (FACT:s0, FACT:q0). Record a facts file to search facts.")
    st.stop()
fact_id = st.selectbox("Fact", in_trace, key="fact", format_func=c.visible)
fact = facts.get(fact_id)
if fact is not None:
    st.markdown(f"{c.md(fact.subject)} — {c.md(fact.relation)} — **{c.md(fact.answer)}**")
link = f"/Fact?fact={quote(fact_id, safe='')}&trace={quote(trace_name, safe='')}"
st.dataframe(pd.DataFrame({"fact": [fact_id], "open": [link]}), hide_index=True, key="fact_link",
             column_config={"open": st.column_config.LinkColumn("open", display_text="fact page")})
try:
    core = c.as_int_list(core_set(trace, fact_id, layer=layer))
except SmvizError as err:
    st.info(f"No core set: {err}")
    core = []
if core:
    st.markdown(f"Core set: the {len(core)} slots read by every statement of the fact and by its questions.")
    slots_table(pd.DataFrame({"slot": core, "reads in trace": [index.count(s, layer) for s in core]}), "fact_core")
for run_name in c.runs(ws):
    run = c.load_run(str(ws.run(run_name)))
    if run.base_model_hash != trace.model_hash or not c.selects(run):
        continue
    chosen = run.selected(by="fact")
    if fact_id in chosen:
        st.markdown(f"Selected for it by run **{c.md(run_name)}** ({c.md(run.method)}):")
        slots_table(pd.DataFrame({"slot": c.as_int_list(chosen[fact_id])}), f"fact_run_{run_name}")
