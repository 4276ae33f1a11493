"""Shared loading and caching for the smviz Streamlit app: the workspace from `SMVIZ_WORKSPACE`, cached
traces, indices, runs (and the items of their streams), models and statistics, and the escaped HTML of
a highlighted context. Nothing here analyses: every number comes from `smviz` library functions."""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's smviz when run from a checkout

from smviz.workspace.layout import FACTS_GLOB, Workspace  # noqa: E402
from smviz.model import CONFIG_FILE  # noqa: E402
from smviz.trace import META_FILE  # noqa: E402
from smviz.train.rundir import CONFIG as RUN_CONFIG  # noqa: E402

ENV = "SMVIZ_WORKSPACE"

CONTEXT_CSS = (
    "<style>.smviz-context{font-family:monospace;white-space:pre-wrap;padding:2px 6px;margin:2px 0;"
    "border-left:3px solid #ddd}.smviz-meta{color:#888;font-size:0.8em}</style>"
)


def workspace() -> Workspace:
    """The workspace named by SMVIZ_WORKSPACE; stops the page with an error when it is unset or absent."""
    root = os.environ.get(ENV)
    if not root:
        st.error(f"No workspace: set {ENV} or start the app with `smviz app --workspace WS`.")
        st.stop()
    if not Path(root).is_dir():
        st.error(f"Workspace {root} does not exist. Build one with `smviz demo --workspace {root}`.")
        st.stop()
    return Workspace(root)


def names(parent: Path, marker: str) -> list[str]:
    """Sub-directories of `parent` holding file `marker`, sorted."""
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and (p / marker).is_file())


def models(ws: Workspace) -> list[str]:
    return names(ws.models_dir, CONFIG_FILE)


def traces(ws: Workspace) -> list[str]:
    return names(ws.traces_dir, META_FILE)


def runs(ws: Workspace) -> list[str]:
    return names(ws.runs_dir, RUN_CONFIG)


# ---------------------------------------------------------------- the commands that make missing pieces

def cmd_model(ws: Workspace) -> str:
    return f"smviz demo --workspace {ws.root}"


def cmd_stats(ws: Workspace, model: str = "NAME") -> str:
    return f"smviz stats --model {ws.model(model)}"


def cmd_record(ws: Workspace, model: str = "NAME") -> str:
    return f"smviz record --model {ws.model(model)} --input {ws.facts('new')} --out {ws.trace('NAME')}"


def cmd_finetune(ws: Workspace, model: str = "NAME") -> str:
    return f"smviz finetune --model {ws.model(model)} --workspace {ws.root} --method sparse --out {ws.run('NAME')}"


def require(items: list[str], what: str, command: str) -> None:
    """Stop the page with what is missing and the command that makes it."""
    if not items:
        st.warning(f"This workspace has no {what} yet. Make one with:")
        st.code(command, language="bash")
        st.stop()


def first_model(ws: Workspace) -> str:
    m = models(ws)
    return m[0] if m else "NAME"


# ---------------------------------------------------------------- cached loaders

@st.cache_resource(show_spinner="Loading trace and slot index…")
def load_trace(path: str):
    """(Trace, SlotIndex) of the trace directory `path`, loaded once per process."""
    from smviz.trace import Trace

    trace = Trace.load(path)
    index = trace.slot_index()
    index.token_columns()  # warm the token columns the contexts read
    return trace, index


@st.cache_resource(show_spinner="Loading run…")
def load_run(path: str):
    from smviz.analysis import Run

    return Run(path)


@st.cache_resource(show_spinner="Loading model…")
def load_model(path: str):
    from smviz.model import MemoryModel

    return MemoryModel.from_pretrained(path)


@st.cache_resource(show_spinner=False)
def load_stats(model_dir: str):
    from smviz.stats import STATS_FILE, SlotStats

    if not (Path(model_dir) / STATS_FILE).is_file():
        return None
    return SlotStats.load_for_model(model_dir)


@st.cache_data(show_spinner=False)
def model_hashes(root: str) -> dict[str, str]:
    """{model name: model hash} of the workspace's models, base models (`smviz import`) included: each
    directory verified, no weights loaded."""
    from smviz.model import model_dir_hash

    ws = Workspace(root)
    return {name: model_dir_hash(ws.model(name)) for name in models(ws)}


def base_model(ws: Workspace, hash_: str | None) -> str | None:
    """Name of the workspace model whose hash is `hash_` (a run's or a trace's base)."""
    for name, h in model_hashes(str(ws.root)).items():
        if h == hash_:
            return name
    return None


@st.cache_resource(show_spinner="Reading facts…")
def load_facts(data_dir: str) -> dict[str, Any]:
    """{fact id: Fact} of every facts file (facts-*.jsonl) in the data directory."""
    from smviz.data.facts import read_facts

    out: dict[str, Any] = {}
    for path in sorted(Path(data_dir).glob(FACTS_GLOB)):
        for fact in read_facts(path):
            out.setdefault(fact.id, fact)
    return out


@st.cache_resource(show_spinner="Reading the run's stream…")
def load_run_facts(run_path: str) -> dict[str, Any]:
    """{fact id: Fact} of a facts run's stream (stream.jsonl)."""
    from smviz.data.schema import Fact

    return {d["id"]: Fact.from_dict(d) for d in load_run(run_path).items}


WORKSPACE_FACTS = "facts"
"""The item source of the workspace's facts files (`item_sources`); a run's is "run:NAME"."""


def item_sources(ws: Workspace, facts: dict[str, Any]) -> dict[str, str]:
    """{source: label} of what the Fact page shows items of: the workspace's facts (`facts`), then each
    run whose stream holds items they do not — another kind of data (QA, documents, edits) or facts
    from another file."""
    out = {WORKSPACE_FACTS: f"workspace facts ({len(facts)})"} if facts else {}
    for name in runs(ws):
        run = load_run(str(ws.run(name)))
        items = run.items
        if items and (run.stream != "facts" or any(d["id"] not in facts for d in items)):
            out[f"run:{name}"] = f"run {name}: {len(items)} {run.stream}"
    return out


@st.cache_resource(show_spinner="Finding entities (spaCy)…")
def load_entities(trace_path: str, data_dir: str):
    """(spans, token alignment, slot entity profile) of a trace."""
    from smviz.analysis import align_tokens, entity_spans, load_pipeline, slot_entity_profile

    facts = load_facts(data_dir)
    entities = [e for f in facts.values() for e in f.entities]
    nlp = load_pipeline(None, fallback=True, fallback_entities=entities)
    trace, _ = load_trace(trace_path)
    spans = entity_spans(trace, nlp)
    tokens = align_tokens(trace, spans)
    profile = slot_entity_profile(trace, tokens, min_reads=1)
    return spans, tokens, profile


@st.cache_data(show_spinner=False)
def step_history(run_path: str) -> pd.DataFrame:
    """Every step's stored selection (`smviz.analysis.slots.selection_history`)."""
    from smviz.analysis.slots import selection_history

    return selection_history(load_run(run_path))


@st.cache_data(show_spinner=False)
def value_norms(run_path: str, model_dir: str, slot: int, layer: int) -> pd.DataFrame:
    """‖value row of `slot`‖ after every step of a sparse run (`smviz.analysis.slots.value_norm_history`)."""
    from smviz.analysis.slots import value_norm_history

    return value_norm_history(load_run(run_path), load_model(model_dir), slot, layer=layer)


# ---------------------------------------------------------------- rendering

def e(text: Any) -> str:
    """HTML-escaped text (quotes too): corpus and fact text is data, never markup."""
    return html.escape(str(text), quote=True)


def context_html(row: pd.Series, max_weight: float) -> str:
    """One context of `SlotIndex.contexts` as escaped HTML, the accessing token highlighted by weight."""
    window = list(row["window"])
    f = int(row["focus"])
    alpha = 0.15 + 0.85 * (float(row["weight"]) / max_weight if max_weight > 0 else 1.0)
    left = e("".join(window[:f]))
    right = e("".join(window[f + 1 :]))
    focus = e(window[f])
    meta = e(f"#{int(row['rank'])} · {row['doc_id']} · pos {int(row['position'])} · weight {float(row['weight']):.3f}")
    return (
        f'<div class="smviz-context"><span class="smviz-meta">{meta}</span><br>{left}'
        f'<mark class="smviz-focus" style="background: rgba(255, 140, 0, {alpha:.2f})">{focus}</mark>{right}</div>'
    )


def slot_link(trace: str, slot: int) -> str:
    return f"/Slot?trace={trace}&slot={int(slot)}"


def with_links(df: pd.DataFrame, trace: str | None, column: str = "slot") -> tuple[pd.DataFrame, dict]:
    """`df` with an 'open' column linking each slot to the Slot page (when a trace is known)."""
    if trace is None or column not in df.columns:
        return df, {}
    df = df.copy()
    df.insert(0, "open", [slot_link(trace, s) for s in df[column]])
    return df, {"open": st.column_config.LinkColumn("open", display_text="slot page")}


def as_int_list(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).ravel()]


def selects(run) -> bool:
    """Whether a run stores selected slots (sparse methods; full and LoRA select none)."""
    try:
        return bool(run.steps["selected"].map(len).sum())
    except Exception:  # unfinished run without steps.parquet
        return False
