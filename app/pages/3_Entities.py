"""smviz app — Entities: which slots fire on an entity label or string, and a slot's entity profile."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

st.set_page_config(page_title="smviz — Entities", layout="wide")
st.title("Entities")
ws = c.workspace()
trace_names = c.traces(ws)
c.require(trace_names, "traces", c.cmd_record(ws, c.first_model(ws)))
trace_name = st.selectbox("Trace", trace_names, key="trace")
trace, _ = c.load_trace(str(ws.trace(trace_name)))
if trace.summary_only:
    st.info(c.summary_only_note(trace_name, "Aligning entities with the slots their tokens read"))
    st.stop()
spans, tokens, profile = c.load_entities(str(ws.trace(trace_name)), str(ws.data))
if spans.empty:
    st.info("No entities found in this trace's documents.")
    st.stop()

labels = sorted(spans["label"].unique())
st.subheader("Slots most enriched for an entity label")
label = st.selectbox("Entity label", labels, key="label")
col = f"share_{label}"
by_label = profile[profile["reads"] >= 2].sort_values([col, "reads"], ascending=[False, False]).head(20)
shown, config = c.with_links(by_label[["slot", "reads", col, "entity_mass_share", "top1", "log_odds", "q_value"]], trace_name)
st.dataframe(shown, hide_index=True, column_config=config, key="label_table")

st.subheader("Slots most enriched for an entity string")
strings = spans["text"].value_counts()
string = st.selectbox("Entity string", list(strings.index), key="string")
model_name = c.base_model(ws, trace.model_hash)
stats = c.load_stats(str(ws.model(model_name))) if model_name else None
rows = tokens["row"].to_numpy()[(tokens["text"] == string).to_numpy()]
if stats is None:
    st.info("Ranking needs the model's background statistics. Make them with:")
    st.code(c.cmd_stats(ws, model_name or "NAME"), language="bash")
elif len(rows) == 0:
    st.info(f"No token of the trace lies in {string!r}.")
else:
    from smviz.analysis import tfidf_table, trace_slot_counts

    layer = trace.layers[0]
    counts = trace_slot_counts(trace, rows=rows, layer=layer)
    table = tfidf_table(counts, stats, layer).head(20)
    st.caption(f"{len(rows)} tokens of {int(strings[string])} mentions; slots ranked by TF-IDF of these tokens' reads against the background.")
    shown, config = c.with_links(table[["rank", "slot", "count", "tf", "df", "score"]], trace_name)
    st.dataframe(shown, hide_index=True, column_config=config, key="string_table")

st.subheader("Entity profile of a slot")
slot = int(st.number_input("Slot id", min_value=0, max_value=trace.n_slots - 1, step=1, key="slot"))
row = profile[profile["slot"] == slot]
if row.empty:
    st.info(f"Slot {slot} is not read in trace {trace_name}.")
else:
    r = row.iloc[0]
    st.write(f"Slot {slot}: {int(r['reads'])} reads, {r['entity_mass_share']:.1%} of its mass on entity tokens "
             f"(log-odds {r['log_odds']:.2f}, q = {r['q_value']:.3g}); top strings: "
             + ", ".join(repr(str(r[f'top{i}'])) for i in range(1, 4) if str(r[f'top{i}'])))
    st.dataframe(row, hide_index=True, key="profile_row")
    from smviz import figures

    st.plotly_chart(figures.entity_share_figure(profile, slot), key="entity_fig")
