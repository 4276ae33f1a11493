"""smviz app — Slot: one memory slot's page, as Neuronpedia has one per SAE feature. A label and a summary
card (reads, density, weights, sub-keys, value norm, background DF/IDF, entity label, runs), then tabs:
top contexts and weight intervals, histograms, logit effects, ablation, neighbours, the key map, runs,
entities; export of the card with its contexts (JSON, Parquet) and a provenance footer."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

from smviz import figures  # noqa: E402
from smviz.analysis import (  # noqa: E402
    ablation_effects,
    co_accessed,
    co_read_neighbours,
    key_map,
    promoted_tokens,
    rank_histogram,
    slot_card,
    slot_label,
    subkey_neighbours,
    value_neighbours,
    weight_buckets,
)
from smviz.errors import SmvizError  # noqa: E402
from smviz.stats import STATS_FILE  # noqa: E402
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


@st.cache_data(show_spinner=False)
def most_read(trace_path: str, layer: int, n: int = 50) -> pd.DataFrame:
    """The `n` most-read slots of the trace's layer (reads descending, ties to the lower id) with their
    labels: the slot picker's choices."""
    trace, index = c.load_trace(trace_path)
    counts = index.slot_counts(layer)
    order = np.argsort(-counts, kind="stable")[:n]
    order = order[counts[order] > 0]
    return pd.DataFrame({"slot": order.astype(np.int64), "reads": counts[order],
                         "label": [slot_label(index, int(s), layer) for s in order]})


@st.cache_data(show_spinner="Summarising the slot…")
def card_of(trace_path: str, slot: int, layer: int, model_dir: str | None, run_paths: tuple[str, ...],
            data_dir: str | None) -> dict:
    """`slot_card` with the trace's model, its background statistics, the runs of that model and (with
    `data_dir`) the trace's slot entity profile."""
    _, index = c.load_trace(trace_path)
    model = c.load_model(model_dir) if model_dir else None
    stats = c.load_stats(model_dir) if model_dir else None
    profile = c.load_entities(trace_path, data_dir)[2] if data_dir else None
    return slot_card(index, slot, layer, model=model, stats=stats, runs=[c.load_run(p) for p in run_paths],
                     entity_profile=profile)


@st.cache_data(show_spinner=False)
def value_cosine(model_dir: str, slot: int, layer: int) -> pd.DataFrame:
    """`value_neighbours` (one pass over the value table), once per slot."""
    return value_neighbours(c.load_model(model_dir), slot, layer)


def _pick_from_table(key: str) -> None:
    """A row selected in a table of slots becomes the slot shown."""
    state = st.session_state.get(key)
    rows = state.selection.rows if state is not None else []
    table = st.session_state.get(f"{key}__slots", [])
    if rows and rows[0] < len(table):
        st.session_state["slot"] = int(table[rows[0]])


def _picked() -> None:
    if st.session_state.get("slot_pick") is not None:
        st.session_state["slot"] = int(st.session_state["slot_pick"])


def slot_table(df: pd.DataFrame, key: str, caption: str | None = None) -> None:
    """A table of slots, each linked to its page; selecting a row opens that slot here."""
    if caption:
        st.caption(caption)
    st.session_state[f"{key}__slots"] = df["slot"].tolist() if "slot" in df.columns else []
    shown, config = c.with_links(df, trace_name)
    st.dataframe(shown, hide_index=True, column_config=config, key=key, on_select=_pick_from_table, selection_mode="single-row")


def fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


# ---------------------------------------------------------------- picking the slot

pick = st.columns([2, 1, 4, 2])
trace_name = pick[0].selectbox("Trace", trace_names, key="trace")
trace_path = str(ws.trace(trace_name))
trace, index = c.load_trace(trace_path)
layer = pick[1].selectbox("Memory layer", trace.layers, key="layer") if len(trace.layers) > 1 else trace.layers[0]
pick[1].caption(f"{trace.n_slots:,} slots")
top = most_read(trace_path, layer)
if "slot" not in st.session_state or not 0 <= int(st.session_state["slot"]) < trace.n_slots:
    st.session_state["slot"] = int(top["slot"].iloc[0]) if len(top) else 0  # the most-read slot, not slot 0
labels = dict(zip(top["slot"], zip(top["reads"], top["label"])))
st.session_state["slot_pick"] = int(st.session_state["slot"]) if int(st.session_state["slot"]) in labels else None
pick[2].selectbox("Most-read slots", list(labels), key="slot_pick", on_change=_picked, placeholder="jump to a most-read slot…",
                  format_func=lambda s: c.visible(f"{s} · {labels[s][0]:,} reads · {labels[s][1] or '—'}"))
slot = int(pick[3].number_input("Slot id", min_value=0, max_value=trace.n_slots - 1, step=1, key="slot"))
st.query_params["trace"], st.query_params["slot"] = trace_name, str(slot)
st.markdown(c.SLOT_CSS, unsafe_allow_html=True)

base = c.base_model(ws, trace.model_hash)
model_dir = str(ws.model(base)) if base is not None else None
run_names = [r for r in c.runs(ws) if c.load_run(str(ws.run(r))).base_model_hash == trace.model_hash]
entities_on = bool(st.session_state.get("entities_on", False)) and len(trace.layers) == 1
try:
    card = card_of(trace_path, slot, layer, model_dir, tuple(str(ws.run(r)) for r in run_names), str(ws.data) if entities_on else None)
except SmvizError as err:  # e.g. a model whose memory differs from the trace's: the card without it
    st.warning(f"Summary without the model and runs: {err}")
    card = card_of(trace_path, slot, layer, None, (), None)
n_reads = card["reads"]

# ---------------------------------------------------------------- header and summary card

st.header(f"Slot {slot}" + (f" · layer {layer}" if len(trace.layers) > 1 else ""))
st.markdown(f"**{c.md(card['label'])}**" if card["label"] else f"Never read in trace {c.md(trace_name)} (a dead slot here).")
st.markdown(f"[Steer this slot](/Steer?slot={slot}) · [Probe a text](/Probe) · [Search slots](/Search?trace={quote(trace_name, safe='')})")
row1 = st.columns(6)
row1[0].metric("Reads in trace", f"{card['reads']:,}", help="every read: tokens × heads")
row1[1].metric("Reading tokens", f"{card['reading_tokens']:,}")
row1[2].metric("Density", f"{card['density']:.1%}", help="share of the trace's tokens whose top-k holds the slot in any head")
row1[3].metric("Mean weight", fmt(card["mean_weight"], ".3f"))
row1[4].metric("Max weight", fmt(card["max_weight"], ".3f"))
row1[5].metric("Sub-keys (i1, i2)", f"({card['i1']}, {card['i2']})", help="slot = i1 · n_keys + i2")
row2 = st.columns(6)
ratio = (card["value_norm"] / card["median_value_norm"]) if card["value_norm"] is not None and card["median_value_norm"] else None
row2[0].metric("Value norm", fmt(card["value_norm"], ".3f"), delta=None if ratio is None else f"{ratio:.2f}× median",
               delta_color="off", delta_arrow="off", help=None if base else "the trace's model is not in the workspace's models/")
row2[1].metric("Median value norm", fmt(card["median_value_norm"], ".3f"))
row2[2].metric("Background DF", "—" if card["df"] is None else f"{card['df']:,} / {card['background_docs']:,}",
               help=f"documents ({c.plural(card['background_unit'] or 'unit')}) of the background that read it")
row2[3].metric("IDF", fmt(card["idf"], ".3f"))
entity = "—" if card["entity_label"] is None else f"{card['entity_label']} ({card['entity_share']:.0%})"
row2[4].metric("Entity label", entity, help=None if entities_on else "turn on 'Label entities' in the Entities tab")
row2[5].metric("Entity q-value", fmt(card["entity_q_value"], ".3g"))
summary_only = card["summary_only"]  # per-slot summaries, not every read: what needs every read says so
keep = index.keep if summary_only else 100
if summary_only:
    st.info(f"Trace {trace_name} was recorded with --summary-only: it keeps each slot's counts, its top {keep} and a uniform "
            f"sample of {keep} reading tokens, not every read. Per-head density, histograms, weight intervals and co-read "
            "neighbours need every read: record the trace without --summary-only for them.")
else:
    per_head = " · ".join(f"head {h}: {d:.3%}" for h, d in card["density_per_head"].items())
    st.caption(f"Density per head: {per_head}")
if card["runs"]:
    runs_df = pd.DataFrame(card["runs"]).assign(run=lambda d: d["run"].map(lambda p: Path(p).name))
    st.dataframe(runs_df[["run", "method", "selected", "steps_selected", "best_rank", "delta_norm"]], hide_index=True,
                 key="card_runs", column_config={"delta_norm": st.column_config.NumberColumn("‖ΔV‖", format="%.4f"),
                                                 "best_rank": st.column_config.NumberColumn("best rank")})

tabs = st.tabs(["Contexts", "Histograms", "Logit effects", "Ablation", "Neighbours", "Key map", "Runs", "Entities"])
ctx = index.contexts(slot, n=min(20, keep), window=8, layer=layer) if n_reads else pd.DataFrame()

# ---------------------------------------------------------------- contexts and weight intervals

with tabs[0]:
    st.subheader(f"Top contexts of slot {slot}")
    if n_reads == 0:
        st.info(f"Slot {slot} is never read in trace {trace_name} (a dead slot here).")
    else:
        n = st.slider("Contexts shown", min(5, keep), keep, min(20, keep), key="n_contexts") if keep > 5 else keep
        ctx = index.contexts(slot, n=n, window=8, layer=layer)
        strongest = float(ctx["weight"].max())
        st.caption("The reading token is marked (darker: more weight, summed over heads); each header line names the token after it.")
        st.markdown("".join(c.context_html(r, strongest) for _, r in ctx.iterrows()), unsafe_allow_html=True)
        with st.expander("Contexts as a table"):
            st.dataframe(ctx[["rank", "doc_id", "position", "token", "next_token", "weight", "reads", "left", "right"]],
                         hide_index=True, key="contexts_table")
        if summary_only:
            st.subheader("A uniform sample of its readers")
            sample = index.sample_contexts(slot, window=8, layer=layer)
            st.caption(f"{len(sample)} of its {card['reading_tokens']:,} reading tokens, each kept with the same chance "
                       "(the summary's bottom-N hash sample), in trace order.")
            st.markdown("".join(c.context_html(r, strongest) for _, r in sample.iterrows()), unsafe_allow_html=True)
    if n_reads and not summary_only:
        st.subheader("Weight intervals")
        st.caption("The strongest readers, then equal-width weight intervals (highest first, up to 5 tokens drawn from each), "
                   "then 5 readers drawn at random.")
        buckets = weight_buckets(index, slot, layer)
        parts = []
        for label, group in buckets.groupby("bucket", sort=False):
            head = group.iloc[0]
            parts.append(f'<div class="smviz-meta"><b>{c.esc(label)}</b> · weight {head["bucket_lo"]:.3f}–{head["bucket_hi"]:.3f} · '
                         f'{int(head["bucket_tokens"]):,} tokens</div>')
            parts.extend(c.context_html(r, strongest, bucket=True) for _, r in group.iterrows())
        st.markdown("".join(parts), unsafe_allow_html=True)
        with st.expander("Intervals as a table"):
            st.dataframe(buckets.drop(columns=["window", "focus"]), hide_index=True, key="buckets_table")

# ---------------------------------------------------------------- histograms

with tabs[1]:
    if n_reads == 0:
        st.info("No reads, no histograms.")
    elif summary_only:
        st.info("The weight and rank histograms need every read; this trace keeps per-slot summaries only "
                f"(mean weight {fmt(card['mean_weight'], '.3f')}, max {fmt(card['max_weight'], '.3f')}).")
    else:
        left, right = st.columns(2)
        left.plotly_chart(figures.weight_histogram(index.slot_weights(slot, layer), slot=slot), key="weight_hist")
        right.plotly_chart(figures.rank_histogram_figure(rank_histogram(index, slot, layer), slot=slot), key="rank_hist")
        st.caption("Traces store each read's softmax weight and rank, not the raw key score.")

# ---------------------------------------------------------------- logit effects


@st.cache_data(show_spinner="Projecting the value row…")
def promoted(model_dir: str, trace_path: str | None, slot: int, layer: int) -> pd.DataFrame:
    tr = c.load_trace(trace_path)[0] if trace_path else None
    with c.live_model(model_dir) as model:
        return promoted_tokens(model, slot, layer, trace=tr, k=10)


with tabs[2]:
    st.subheader("Promoted tokens")
    if base is None:
        st.info("The model this trace was recorded with is not in the workspace's models/.")
    else:
        try:
            pt = promoted(model_dir, trace_path if n_reads else None, slot, layer)
        except SmvizError as err:
            st.warning(f"No vocabulary projection: {err}")
        else:
            gate = pt.attrs.get("gate")
            st.caption(f"Value row → gate ({gate}" + (f", mean over {pt.attrs.get('n_contexts')} reading tokens" if gate == "contexts" else "")
                       + ") → output projection → final norm → unembedding; the residual stream is left out.")
            left, right = st.columns([2, 3])
            left.dataframe(pt, hide_index=True, key="promoted_table")
            right.plotly_chart(figures.promoted_tokens_figure(pt), key="promoted_fig")

# ---------------------------------------------------------------- ablation

with tabs[3]:
    st.subheader("Dropping the slot")
    if base is None or n_reads == 0:
        st.info("Ablation reruns the slot's top contexts through the trace's model: it needs that model in models/ and a read slot.")
    else:
        cols = st.columns([1, 1, 2])
        n_ab = cols[0].number_input("Top contexts", 1, keep, min(10, keep), key="n_ablate")
        renorm = cols[1].checkbox("Renormalise the head's other reads", value=True, key="ablate_renorm")
        if cols[2].button("Measure Δ log-prob of the next token", key="ablate_slot"):
            try:
                with c.live_model(model_dir) as model:
                    effects = ablation_effects(model, index, slot, n=int(n_ab), layer=layer, renormalise=renorm)
                st.session_state["slot_ablation"] = (trace_name, layer, slot, effects)
            except SmvizError as err:
                st.warning(f"Could not ablate: {err}")
        done = st.session_state.get("slot_ablation")
        if done is not None and done[:3] == (trace_name, layer, slot):
            effects = done[3]
            st.metric("Mean Δ log-prob (nats)", fmt(float(effects["delta"].mean()) if effects["delta"].notna().any() else None, ".4f"))
            st.dataframe(effects, hide_index=True, key="ablation_table")
        else:
            st.caption("Runs the model on each context with the slot dropped from every head's top-k (not run until asked).")

# ---------------------------------------------------------------- neighbours

with tabs[4]:
    if n_reads:
        left, right = st.columns(2)
        if summary_only:
            left.info("Co-read slots need every read (which tokens read which slots); this trace keeps per-slot summaries.")
    if n_reads and not summary_only:
        with left:
            st.subheader("Co-read slots")
            co = co_read_neighbours(index, slot, layer)
            slot_table(co, "co_read_table", f"Read by the same tokens (all {co.attrs['readers']:,} of its reading tokens): "
                                            "Jaccard and PMI of the token sets.")
            with st.expander("Co-accessed by its 200 strongest reads"):
                slot_table(co_accessed(index, slot, layer=layer), "co_table")
    if n_reads:
        with right:
            st.subheader("Sub-key neighbours")
            slot_table(subkey_neighbours(index.slot_counts(layer), slot, int(trace.meta["memory"]["n_keys"])), "subkey_table",
                       f"Slots sharing its first sub-key (row i1 = {card['i1']}) or its second (column i2 = {card['i2']}), where read.")
    else:
        st.info("A dead slot has no co-read or sub-key neighbours in this trace.")
    st.subheader("Value-cosine neighbours")
    if base is None:
        st.info("Value neighbours need the trace's model in models/.")
    else:
        slot_table(value_cosine(model_dir, slot, layer), "value_table",
                   "Slots whose value rows point the most the same way (cosine).")

# ---------------------------------------------------------------- key map

with tabs[5]:
    n_keys = int(trace.meta["memory"]["n_keys"])
    st.plotly_chart(figures.key_map_figure(key_map(index.slot_counts(layer), n_keys), slot=slot), key="key_map_fig")
    st.caption(f"{n_keys} × {n_keys} sub-key pairs; slot {slot} = {card['i1']} · {n_keys} + {card['i2']} (the cross).")

# ---------------------------------------------------------------- runs: selection history, value norms

with tabs[6]:
    selecting = [r for r in run_names if c.selects(c.load_run(str(ws.run(r))))]
    st.subheader("Across the steps of a run")
    if not selecting:
        st.info("No run of this trace's model selects slots yet (sparse finetuning does). Start one with:")
        st.code(c.cmd_finetune(ws, base or "NAME"), language="bash")
    else:
        run_name = st.selectbox("Run", selecting, key="run")
        run = c.load_run(str(ws.run(run_name)))
        hist = c.step_history(str(ws.run(run_name)))
        steps = sorted(int(s) for s in run.steps["step"].unique())
        mine = hist[(hist["slot"] == slot) & (hist["layer"] == layer)][["step", "fact_id", "rank", "score", "tf", "df"]]
        full = pd.DataFrame({"step": steps}).merge(mine, on="step", how="left")
        full["selected"] = full["rank"].notna()
        full["score"] = full["score"].fillna(0.0)
        st.write(f"Selected in **{int(full['selected'].sum())}** of {len(steps)} steps of run {c.md(run_name)} ({run.method}).")
        st.dataframe(full, hide_index=True, key="selection_history")
        st.plotly_chart(figures.tfidf_history(full, slot=slot), key="tfidf_fig")
        run_base = c.base_model(ws, run.base_model_hash)
        if run_base is not None and FinetuneRunDir(ws.run(run_name)).has_deltas():
            st.plotly_chart(figures.value_norm_history(c.value_norms(str(ws.run(run_name)), str(ws.model(run_base)), slot, layer), slot=slot),
                            key="norm_fig")

# ---------------------------------------------------------------- entities

with tabs[7]:
    st.subheader("Entities it fires on")
    if st.toggle("Label entities (spaCy)", value=False, key="entities_on"):
        _, tokens, profile = c.load_entities(trace_path, str(ws.data))
        row = profile[profile["slot"] == slot]
        if row.empty:
            st.info(f"Slot {slot} has no reads to profile.")
        else:
            st.dataframe(row, hide_index=True, key="entity_row")
            st.plotly_chart(figures.entity_share_figure(profile, slot), key="entity_fig")
    else:
        st.caption("Off by default: running the NER pipeline the first time takes a few seconds per thousand documents. "
                   "On, the summary card shows the slot's entity label and q-value.")

# ---------------------------------------------------------------- export and provenance

stats = c.load_stats(model_dir) if model_dir else None
source = trace.meta.get("source") or {}
provenance = {
    "model_hash": trace.model_hash, "model": base, "trace": trace_name, "trace_path": trace_path,
    "trace_source": source.get("name") if isinstance(source, dict) else str(source), "layer": layer, "n_slots": trace.n_slots,
    "counts": {"docs": trace.n_docs, "tokens": trace.n_tokens, "reads": trace.n_accesses},
    "background": None if stats is None else {"file": str(Path(model_dir) / STATS_FILE), "docs": stats.n_docs, "unit": stats.unit},
    "contexts": len(ctx),
}
st.divider()
exp = st.columns([1, 1, 3])
as_json, as_parquet = c.export_bytes(card, ctx, provenance)
stem = f"slot-{trace_name}-L{layer}-{slot}"
exp[0].download_button("Card + contexts (JSON)", as_json, file_name=f"{stem}.json", mime="application/json", key="export_json")
exp[1].download_button("Card + contexts (Parquet)", as_parquet, file_name=f"{stem}.parquet", mime="application/octet-stream",
                       key="export_parquet")
with exp[2].expander("The card as JSON"):
    st.json(card)
background = ("no background statistics" if stats is None else
              f"background: {stats.n_docs:,} {c.plural(stats.unit)} ({c.md(base)}/{STATS_FILE})")
st.caption(f"Model {c.md(trace.model_hash or 'unknown')} ({c.md(base or 'not in models/')}) · trace {c.md(trace_name)}"
           f" of {c.md(provenance['trace_source'] or 'in-memory recording')} · {trace.n_tokens:,} tokens, {trace.n_docs:,} documents, "
           f"{trace.n_accesses:,} reads · {background} · {len(ctx)} contexts exported")
