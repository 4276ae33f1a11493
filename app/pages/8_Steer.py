"""smviz app — Steer: drop, force or rescale chosen memory slots while the model generates, and compare
the greedy continuation and the answer's log-probability before and after (Neuronpedia's steering)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz.analysis import steer_generate  # noqa: E402
from smviz.errors import SmvizError  # noqa: E402

st.set_page_config(page_title="smviz — Steer", layout="wide")
st.title("Steer")
ws = c.workspace()
model_names = c.memory_models(ws)
c.require(model_names, "models with memory layers", c.cmd_model(ws))

# ?slot=N (or N,M) prefills the slots, e.g. from a slot page
def steered_text(model_dir: str, request: dict) -> dict:
    with c.live_model(model_dir) as model:
        return steer_generate(model, **request)


if "slots" not in st.session_state and re.fullmatch(r"\d+(,\d+)*", str(st.query_params.get("slot", ""))):
    st.session_state["slots"] = str(st.query_params.get("slot")).replace(",", ", ")

facts = c.load_facts(str(ws.data)) if ws.data.is_dir() else {}
first = next(iter(facts.values()), None)

top = st.columns([2, 1, 1])
model_name = top[0].selectbox("Model", model_names, key="model")
model_dir = str(ws.model(model_name))
try:
    model = c.load_model(model_dir)
except SmvizError as err:
    st.error(f"Model {model_name} cannot be loaded: {err}")
    st.stop()
layers = list(model.memory_layers)
layer = top[1].selectbox("Memory layer", layers, key="layer") if len(layers) > 1 else layers[0]
n_slots = model.memory_config.n_slots
top[2].caption(f"{n_slots:,} slots per layer, top-{model.memory_config.knn} per head")

left, right = st.columns([1, 2])
with left:
    slots_text = st.text_input("Slots", key="slots", placeholder="e.g. 12, 40", help="slot ids, separated by commas or spaces")
    mode = st.radio("Mode", ["zero", "force", "scale"], horizontal=True, key="mode",
                    help="zero: drop the slots' reads; force: put them into every head's top-k; scale: multiply their read weights")
    renormalise = force_weight = factor = None
    if mode == "zero":
        renormalise = st.checkbox("Renormalise the head's other reads (dropped from the top-k)", value=True, key="renormalise")
    elif mode == "force":
        force_weight = st.slider("Weight of each forced read", 0.05, 1.0, 0.5, 0.05, key="force_weight")
    else:
        factor = st.number_input("Factor", value=2.0, step=0.5, key="factor", help="0 zeroes without renormalising, 1 changes nothing")
    max_new = int(st.number_input("New tokens", 1, 200, 20, key="max_new_tokens"))
with right:
    question = st.checkbox("The prompt is a question (asked in the QA format the model was trained on)", value=first is not None,
                           key="question")
    prompt = st.text_area("Prompt", first.questions[0].text if first is not None else "The capital of France is", height=90, key="prompt")
    answer = st.text_input("Answer to score (optional)", first.answer if first is not None else "", key="answer")

try:
    slots = sorted({int(s) for s in re.split(r"[,\s]+", slots_text.strip()) if s}) if slots_text.strip() else []
except ValueError:
    st.warning(f"Slots must be whole numbers separated by commas or spaces, got {c.visible(slots_text)!r}.")
    slots = []
bad = [s for s in slots if not 0 <= s < n_slots]
if bad:
    st.warning(f"Slot ids must lie in 0..{n_slots - 1}: {bad} left out.")
    slots = [s for s in slots if 0 <= s < n_slots]

request = dict(prompt=prompt, answer=answer.strip() or None, max_new_tokens=max_new, question=question, layer=layer)
if mode == "zero":
    request.update(zero=slots, renormalise=renormalise)
elif mode == "force":
    request.update(force=slots, force_weight=force_weight)
else:
    request.update(scale=dict.fromkeys(slots, float(factor)))

if st.button("Generate before / after", key="generate", type="primary", disabled=not slots or not prompt.strip()):
    try:
        st.session_state["steer_result"] = (model_dir, request, steered_text(model_dir, request))
    except SmvizError as err:
        st.session_state.pop("steer_result", None)
        st.warning(f"Could not steer: {err}")
if not slots:
    st.caption("Give at least one slot id to steer.")

done = st.session_state.get("steer_result")
if done is not None:
    done_dir, done_request, result = done
    if (done_dir, done_request) != (model_dir, request):
        st.caption("Shown: the last generation, for other settings than the ones above — press Generate to update.")
    what = {"zero": "dropped", "force": "forced", "scale": "scaled"}[next(m for m in ("zero", "force", "scale") if m in done_request)]
    chosen = done_request.get("zero") or done_request.get("force") or list(done_request.get("scale", {}))
    st.subheader(f"Slot{'s' if len(chosen) > 1 else ''} {', '.join(map(str, chosen))} {what}" + (" — the continuation changed" if result["changed"] else " — no change"))
    before, after = st.columns(2)
    for col, side, title in ((before, "before", "Before"), (after, "after", "After")):
        with col:
            st.markdown(f"**{title}**")
            st.markdown(c.SLOT_CSS + f'<div class="smviz-context">{c.esc(result["prompt"])}'
                        f'<mark class="smviz-focus">{c.esc(result["text_" + side])}</mark></div>', unsafe_allow_html=True)
            lp = result["logprob_" + side]
            col.metric(f"log p(answer) {side}", "—" if lp is None else f"{lp:.4f}",
                       delta=None if side == "before" or lp is None else f"{result['delta_logprob']:+.4f}")
            st.text(f"{len(result['tokens_' + side])} tokens: {result['tokens_' + side]}")
    if result["answer"] is not None:
        st.caption(f"Answer scored: {c.md(result['answer'])} (natural log-probability of ' ' + answer after the prompt).")
