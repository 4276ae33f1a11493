"""smviz app — Probe: run any text through a memory model live and see which slots each token reads
(Neuronpedia's "test on custom text"): the text token by token, a token × slot heatmap, the top slots
of every token, each linked to its slot page in a trace recorded with that model."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.analysis import read_text, text_top_slots  # noqa: E402
from smviz.errors import SmvizError  # noqa: E402

st.set_page_config(page_title="smviz — Probe", layout="wide")
st.title("Probe")
ws = c.workspace()
model_names = c.memory_models(ws)
c.require(model_names, "models with memory layers", c.cmd_model(ws))


@st.cache_data(show_spinner="Reading the text…", max_entries=64)
def reads_of(model_dir: str, text: str, layer: int | None) -> pd.DataFrame:
    with c.live_model(model_dir) as model:
        return read_text(model, text, layer=layer)


facts = c.load_facts(str(ws.data)) if ws.data.is_dir() else {}
default = next((f.statements[0] for f in facts.values()), "The capital of France is Paris.")
cols = st.columns([3, 1])
text = cols[0].text_area("Text", default, height=100, key="probe_text", max_chars=20_000)
model_name = cols[1].selectbox("Model", model_names, key="model")
model_dir = str(ws.model(model_name))
try:
    model = c.load_model(model_dir)
    layers = list(model.memory_layers)
except SmvizError as err:
    st.error(f"Model {model_name} cannot be loaded: {err}")
    st.stop()
layer = cols[1].selectbox("Memory layer", layers, key="layer") if len(layers) > 1 else layers[0]
top = int(cols[1].number_input("Top slots per token", 1, 32, 5, key="top"))

try:
    reads = reads_of(model_dir, text, layer)
except SmvizError as err:  # an empty text, one longer than the model's context, a model without a tokenizer
    st.warning(str(err))
    st.stop()
per_token = text_top_slots(reads, top)

# the trace whose slot pages the links open: one recorded with this model
linked = c.traces_of_model(ws, model_name)
trace_name = None
if linked:
    trace_name = st.selectbox("Slot pages of trace", linked, key="trace", help="traces recorded with this model") if len(linked) > 1 else linked[0]
    st.caption(f"Slot ids link to their pages in trace {c.md(trace_name)}.")
else:
    st.info(f"No trace in this workspace was recorded with model {model_name}, so the slots below have no slot pages to open. "
            "Record one with:")
    st.code(c.cmd_record(ws, model_name), language="bash")

st.subheader(f"{reads.attrs['n_tokens']} tokens, memory layer {layer}")
# the text token by token: hover a token for its top slots
tips = per_token.groupby("position", sort=True).apply(
    lambda g: ", ".join(f"{s} ({w:.2f})" for s, w in zip(g["slot"], g["weight"])), include_groups=False)
tokens = reads.drop_duplicates("position").set_index("position")["token"]
st.markdown(c.SLOT_CSS + '<div class="smviz-context">' + "".join(
    f'<span class="smviz-tok" title="{c.esc(f"#{p}: " + tips.get(p, ""))}">{c.esc(t)}</span>' for p, t in tokens.items()) + "</div>",
    unsafe_allow_html=True)

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(figures.token_slot_heatmap(reads[reads["layer"] == layer]), key="probe_heatmap")
with right:
    st.caption("Each token's slots by weight summed over heads (the strongest first).")
    wide = per_token.groupby(["position", "token"], sort=True).apply(
        lambda g: ", ".join(f"{s} ({w:.2f})" for s, w in zip(g["slot"], g["weight"])), include_groups=False
    ).rename("top slots (weight)").reset_index()
    st.dataframe(wide.assign(token=wide["token"].map(c.visible)), hide_index=True, key="probe_wide")

st.subheader("Top slots per token")
shown, config = c.with_links(per_token, trace_name)
st.dataframe(shown.assign(token=shown["token"].map(c.visible)), hide_index=True, column_config=config, key="probe_slots")
with st.expander("Every read (token × head × rank)"):
    st.dataframe(reads.assign(token=reads["token"].map(c.visible)), hide_index=True, key="probe_reads")
