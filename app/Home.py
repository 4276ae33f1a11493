"""smviz app — Overview: each run's learning against forgetting, the memory health of each model, and
entry lists of slots to open (the most specific to a trace, the most changed by a run, the most
entity-enriched), then what the workspace holds. The first load reads metadata only (`_common`'s
"home" block); the lists that load models or run spaCy are computed when asked for."""

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
st.caption(f"Workspace: {c.md(ws.root)}")

models = c.model_rows(ws)
traces, trace_infos = c.trace_rows(ws)
model_names = {h: n for n, h in zip(models["model"], models["model_hash"]) if h is not None}  # hash → name
runs, run_configs = c.run_rows(ws, model_names)
stats_models = models.loc[models["background stats"], "model"].tolist()


def model_of(model_hash: str | None) -> str | None:
    """The workspace model with this hash."""
    return model_names.get(model_hash) if model_hash else None


def traces_of(model_hash: str | None) -> list[str]:
    """The traces recorded with the model of this hash."""
    return [n for n, info in trace_infos.items() if model_hash is not None and info["model_hash"] == model_hash]


# ---------------------------------------------------------------- learning against forgetting

st.subheader("Learning against forgetting")
if runs.empty:
    st.warning("No finetuning runs yet: the Steps and Diff pages need one. Start one with:")
    st.code(c.cmd_finetune(ws, c.first_model(ws)), language="bash")
else:
    points = runs[runs["finished"]].dropna(subset=["learning EM", "known EM drop"]).copy()
    points["config"] = [run_configs.get(n, {}) for n in points["run"]]
    if points.empty:
        st.info("No finished run measured both learning on its stream and known facts yet.")
    else:
        st.plotly_chart(figures.learning_forgetting_figure(points), key="runs_scatter")
        st.caption("Learning: exact match on the stream's facts seen, at the end of the run. Forgetting: the drop "
                   "of exact match on known facts from the run's start (start − end; the relative drop is in the table). "
                   "Hover a point for the run's config.")
    left_out = runs.loc[~runs["run"].isin(points["run"]), "run"].tolist()
    if left_out:
        st.caption("Not drawn (unfinished, or without learning or known-fact EM, e.g. an editing stream): "
                   + ", ".join(c.md(n) for n in left_out))
    st.dataframe(runs.drop(columns=[] if runs["problem"].any() else ["problem"]), hide_index=True, key="runs_table")

# ---------------------------------------------------------------- memory health

st.subheader("Memory health")
if models.empty:
    st.warning("No models yet. Build the default workspace (world, tokenizer, pretrained model) with:")
    st.code(c.cmd_model(ws), language="bash")
else:
    health = c.health_rows(ws, stats_models)
    if not health.empty:
        st.dataframe(health, hide_index=True, key="health_table",
                     column_config={"used share": st.column_config.NumberColumn(format="percent")})
        st.caption("From each model's background statistics (the reads of the background corpus): share of slots read, "
                   "slots never read, Gini of the reads (0 = even use, → 1 = all reads on one slot).")
    for row in models.to_dict("records"):
        if pd.notna(row["slots"]) and not row["background stats"]:  # a memory model without statistics
            st.warning(f"Model {c.md(row['model'])} has no background statistics (needed for TF-IDF and sparse finetuning). Make them with:")
            st.code(c.cmd_stats(ws, row["model"]), language="bash")

    sources = [f"background stats: {n}" for n in stats_models] + [f"trace: {n}" for n in trace_infos]
    if sources:
        source = st.selectbox("Reads per slot of", sources, key="usage_source")
        kind, name = source.split(": ", 1)
        if kind == "trace":
            info = trace_infos[name]
            layer = st.selectbox("Memory layer", info["layers"], key="usage_layer")
            usage, counts = c.trace_usage(ws.trace(name), layer)
        else:
            stats = c.stats_of(ws.model(name))
            layer = st.selectbox("Memory layer", list(stats.layers), key="usage_layer")
            usage = stats.usage(layer)
            counts = stats.counts[stats.layer_index(layer)].numpy()
        cols = st.columns(4)
        cols[0].metric("Used share", f"{usage['used_share']:.1%}")
        cols[1].metric("Dead slots", f"{int(usage['dead']):,} / {int(usage['slots']):,}")
        cols[2].metric("Gini", f"{usage['gini']:.3f}")
        cols[3].metric("Accesses", f"{int(usage['accesses']):,}")
        st.dataframe(pd.DataFrame([usage]), hide_index=True, key="usage_table")
        st.plotly_chart(figures.slot_reads_histogram(counts, title=f"Reads per slot — {c.e(source)}, layer {layer}"), key="usage_hist")

# ---------------------------------------------------------------- slots to open

st.subheader("Slots to open")
if not trace_infos:
    st.warning("No traces yet: the Slot, Fact and Entities pages need one. Record one with:")
    st.code(c.cmd_record(ws, c.first_model(ws)), language="bash")
else:
    st.markdown("**Most specific to a trace** — its reads ranked by TF-IDF against the background, as sparse finetuning ranks them")
    rankable = [n for n, info in trace_infos.items() if model_of(info["model_hash"]) in stats_models]
    if not rankable:
        st.info("No trace was recorded with a model that has background statistics; make them with:")
        st.code(c.cmd_stats(ws, model_of(next(iter(trace_infos.values()))["model_hash"]) or "NAME"), language="bash")
    else:
        cols = st.columns([3, 1])
        name = cols[0].selectbox("Trace", rankable, key="home_tfidf_trace")
        info = trace_infos[name]
        layer = cols[1].selectbox("Memory layer", info["layers"], key="home_tfidf_layer")
        table = c.specific_slots(ws.trace(name), ws.model(model_of(info["model_hash"])), layer)
        shown, config = c.with_links(table, name)
        st.dataframe(shown, hide_index=True, column_config=config, key="home_tfidf_table")

    st.markdown("**Changed most by a run** — ‖ΔV‖ of the value rows, the run's final model against its base model")
    finished = runs.loc[runs["finished"], "run"].tolist()
    if not finished:
        st.info("No finished run yet.")
    else:
        run_name = st.selectbox("Run", finished, index=None, key="home_delta_run",
                                placeholder="choose a run (loads its base and final models)")
        if run_name is not None:
            base = runs.set_index("run").loc[run_name, "base model"]  # its workspace name, else its hash
            if base not in models["model"].tolist():
                st.error(f"Run {c.md(run_name)} started from model {c.md(base)}, which is not in {c.md(ws.models_dir)}.")
            else:
                changed = c.changed_slots(str(ws.run(run_name)), str(ws.model(base)), c.run_stamp(ws, run_name))
                layers = sorted(changed["layer"].unique().tolist())
                if not layers:
                    st.info(f"Run {c.md(run_name)} changed no value row (its method trains other parameters).")
                else:
                    layer = st.selectbox("Memory layer", layers, key="home_delta_layer") if len(layers) > 1 else layers[0]
                    top = changed[changed["layer"] == layer].head(c.HOME_TOP)
                    base_traces = traces_of(models.set_index("model").loc[base, "model_hash"])
                    shown, config = c.with_links(top, base_traces[0] if base_traces else None)
                    st.dataframe(shown, hide_index=True, column_config=config, key="home_delta_table")
                    st.caption(f"{len(changed[changed['layer'] == layer]):,} value rows changed in layer {layer}."
                               + (f" Links open trace {c.md(base_traces[0])}, recorded with the base model." if base_traces
                                  else " No trace of the base model to open them in; record one with the command below."))
                    if not base_traces:
                        st.code(c.cmd_record(ws, base), language="bash")

    st.markdown("**Most entity-enriched** — slots that read entity tokens more than the trace's base rate (Fisher exact test, BH q-value)")
    name = st.selectbox("Trace", list(trace_infos), index=None, key="home_entity_trace",
                        placeholder="choose a trace (finds its entities with spaCy: slow)")
    if name is not None:
        table = c.entity_slots(ws.trace(name), ws.data)
        if table.empty:
            st.info(f"No entities found in trace {c.md(name)}.")
        else:
            shown, config = c.with_links(table, name)
            st.dataframe(shown, hide_index=True, column_config=config, key="home_entity_table")

# ---------------------------------------------------------------- what the workspace holds

st.subheader("Workspace")
if not models.empty:
    st.dataframe(models.drop(columns=[] if models["problem"].any() else ["problem"]), hide_index=True, key="models_table")
if not traces.empty:
    st.dataframe(traces.drop(columns=[] if traces["problem"].any() else ["problem"]), hide_index=True, key="traces_table")
if models.empty and traces.empty and runs.empty:
    st.info("The workspace is empty: the commands above make each piece.")
