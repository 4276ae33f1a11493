"""Shared loading and caching for the smviz Streamlit app: the workspace from `SMVIZ_WORKSPACE`, cached
traces, indices, runs (and the items of their streams), models and statistics, and the escaped HTML of
a highlighted context. Nothing here analyses: every number comes from `smviz` library functions."""

from __future__ import annotations

import gc
import html
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    "border-left:3px solid #ddd}.smviz-meta{color:#888;font-size:0.8em}.smviz-nl::before{content:'↵'}</style>"
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

def settle_heap() -> None:
    """Collect garbage, then freeze the objects left (gc.freeze) so later full collections skip them.
    Why: after the libraries, a model and a trace are loaded, a full collection walks every one of those
    long-lived objects and takes ~0.2 s, a render in ten on the Slot page (seen with gc.callbacks). They
    live as long as the process anyway; the caches that made them call this once per resource."""
    gc.collect()
    gc.freeze()


@st.cache_resource(show_spinner="Loading trace and slot index…")
def load_trace(path: str):
    """(Trace, SlotIndex) of the trace directory `path`, loaded once per process."""
    from smviz.trace import Trace

    trace = Trace.load(path)
    index = trace.slot_index()
    index.token_columns()  # warm the token columns the contexts read
    settle_heap()
    return trace, index


@st.cache_resource(show_spinner="Loading run…")
def load_run(path: str):
    from smviz.analysis import Run

    return Run(path)


@st.cache_resource(show_spinner="Loading model…")
def load_model(path: str):
    from smviz.model import MemoryModel

    model = MemoryModel.from_pretrained(path)
    settle_heap()
    return model


@st.cache_resource(show_spinner=False)
def _model_lock(path: str) -> threading.RLock:
    return threading.RLock()  # re-entrant: a page may hold the same model twice (before = after)


@contextmanager
def live_model(path: str) -> Iterator[Any]:
    """The cached model of `path`, held by this script run alone inside the block. Recording, ablation and
    steering attach hooks to the one shared model; a rerun that starts while an earlier one is still
    inside a forward (typing in Probe does that) would otherwise have its calls recorded or steered too."""
    model = load_model(path)
    with _model_lock(path):
        yield model


@st.cache_resource(show_spinner=False)
def load_stats(model_dir: str):
    from smviz.stats import STATS_FILE, SlotStats

    if not (Path(model_dir) / STATS_FILE).is_file():
        return None
    return SlotStats.load_for_model(model_dir)


def model_hashes(root: str) -> dict[str, str]:
    """{model name: model hash} of the workspace's models, base models (`smviz import`) included: each
    from its manifest (`model_hash_of`, cached per manifest; the weights are verified when loaded)."""
    ws = Workspace(root)
    return {name: model_hash_of(ws.model(name)) for name in models(ws)}


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


def slot_link(trace: str, slot: int) -> str:
    """The Slot page of `slot` in `trace` (the trace name URL-quoted)."""
    from urllib.parse import quote

    return f"/Slot?trace={quote(str(trace), safe='')}&slot={int(slot)}"


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


# ---- slot page, probe, search, steer

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_MD_PUNCT = "\\`*_{}[]()#+-.!|~:$^"  # backslash-escaped in markdown; & < > and quotes go to html.escape

SLOT_CSS = CONTEXT_CSS.replace(
    "</style>", ".smviz-bucket{border-left-color:#9bc}.smviz-tok{border-bottom:1px solid #ccc;margin:0 1px}</style>")


def visible(text: Any) -> str:
    """`text` with its bidirectional controls (RTL/LTR overrides, embeddings, isolates, marks) written
    as ⟨U+202E⟩: data text cannot reorder what is shown around it."""
    return "".join(f"⟨U+{ord(ch):04X}⟩" if ch in _BIDI else ch for ch in str(text))


def esc(text: Any) -> str:
    """HTML-escaped text (`e`) with bidirectional controls made visible (`visible`)."""
    return e(visible(text))


def md(text: Any) -> str:
    """Data text to put inside st.markdown (unsafe_allow_html off): markdown punctuation backslash-escaped,
    markup escaped, bidirectional controls visible — it shows as the literal text."""
    return html.escape(visible("".join("\\" + ch if ch in _MD_PUNCT else ch for ch in str(text))), quote=True)


def plural(unit: str) -> str:
    """The plural of a document unit name ('batch' → 'batches', 'sequence' → 'sequences')."""
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def context_html(row: pd.Series, max_weight: float, *, bucket: bool = False) -> str:
    """One context of `SlotIndex.contexts` / `weight_buckets` as escaped HTML: the reading token marked
    by weight (mark.smviz-focus), the token after it named in the header line ("next '…'"; the text
    around the mark stays one run of text). `bucket`: the block of an interval bucket (class
    "smviz-context smviz-bucket")."""
    window = list(row["window"])
    f = int(row["focus"])
    alpha = 0.15 + 0.85 * (float(row["weight"]) / max_weight if max_weight > 0 else 1.0)
    nxt = str(row.get("next_token", "") or "")
    where = f"{row['doc_id']} · pos {int(row['position'])} · weight {float(row['weight']):.3f}"
    meta = esc((f"#{int(row['rank'])} · " if "rank" in row.index else "") + where + f" · next {nxt!r}")
    cls = "smviz-context smviz-bucket" if bucket else "smviz-context"
    # a line-break token would mark nothing visible: its mark draws a ↵ before the break (CSS, not text)
    focus_cls = "smviz-focus smviz-nl" if "\n" in window[f] and not window[f].strip() else "smviz-focus"
    return (
        f'<div class="{cls}"><span class="smviz-meta">{meta}</span><br>{esc("".join(window[:f]))}'
        f'<mark class="{focus_cls}" style="background: rgba(255, 140, 0, {alpha:.2f})">{esc(window[f])}</mark>'
        f"{esc(''.join(window[f + 1:]))}</div>"
    )


def memory_models(ws: Workspace) -> list[str]:
    """The workspace's models that have memory layers (base models from `smviz import` left out)."""
    from smviz.errors import SmvizError
    from smviz.model import is_base_model_dir

    out = []
    for name in models(ws):
        try:
            if not is_base_model_dir(ws.model(name)):
                out.append(name)
        except SmvizError:  # a damaged model directory: not offered
            pass
    return out


def traces_of_model(ws: Workspace, model: str) -> list[str]:
    """The traces recorded with workspace model `model` (matched by model hash, from each trace's
    meta: `trace_info`)."""
    h = model_hashes(str(ws.root)).get(model)
    if h is None:
        return []
    infos = {t: trace_info(str(ws.trace(t)), stamp(ws.trace(t) / META_FILE)) for t in traces(ws)}
    return [t for t, info in infos.items() if info["model_hash"] == h]


def export_bytes(card: dict[str, Any], contexts: pd.DataFrame, provenance: dict[str, Any]) -> tuple[bytes, bytes]:
    """(JSON, Parquet) of a slot card with its contexts and provenance: JSON {"card", "contexts",
    "provenance"} (strict: NaN as null); Parquet = the contexts, card and provenance as JSON in the
    file's key-value metadata (smviz.slot_card, smviz.provenance)."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from smviz.io import json_text

    records = json.loads(contexts.to_json(orient="records")) if len(contexts) else []
    doc = json_text({"card": card, "contexts": records, "provenance": provenance}).encode()
    table = pa.Table.from_pandas(contexts.reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"smviz.slot_card": json_text(card).encode(),
                                           b"smviz.provenance": json_text(provenance).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return doc, buf.getvalue()


# ---- home
# What the Overview (Home.py) shows, read from metadata on its first load: model manifests, trace
# meta.json, run config/summary, background statistics. No weights are hashed, no trace is indexed and
# smviz.analysis (scipy, spaCy glue) is not imported until a list that needs it is asked for. Cached
# values are keyed on the files' mtimes, so a file written again is read again.

HOME_TOP = 15
"""Slots in each entry list of the Overview."""


def stamp(path: str | os.PathLike) -> int:
    """Modification time (ns) of a file, 0 when it is missing: part of a cache key."""
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False)
def manifest_hash(model_dir: str, manifest_stamp: int = 0) -> str:
    """The model hash of a model directory from its manifest (`smviz.model.hash_files`: the hash
    `model_dir_hash` gives, without re-hashing the weights — every loader verifies those when it loads
    them). `manifest_stamp`: the manifest's mtime (`stamp`)."""
    from smviz.model import hash_files
    from smviz.model.format import read_manifest

    return hash_files(read_manifest(Path(model_dir)))


def model_hash_of(model_dir: str | os.PathLike) -> str:
    """`manifest_hash` of a model directory, cached until its manifest is written again."""
    from smviz.model import MANIFEST

    return manifest_hash(str(model_dir), stamp(Path(model_dir) / MANIFEST))


@st.cache_resource(show_spinner=False)
def background_stats(model_dir: str, stats_stamp: int = 0):
    """The background statistics stored with a model (`SlotStats.load` of its slot_stats.safetensors;
    not checked against the weights — `model_rows` compares the hashes), or None when there are none."""
    from smviz.stats import STATS_FILE, SlotStats

    path = Path(model_dir) / STATS_FILE
    return SlotStats.load(path) if path.is_file() else None


def stats_of(model_dir: str | os.PathLike):
    """`background_stats` of a model directory, cached until the statistics are written again."""
    from smviz.stats import STATS_FILE

    return background_stats(str(model_dir), stamp(Path(model_dir) / STATS_FILE))


MODEL_ROW_COLUMNS = ["model", "model_hash", "memory layers", "slots", "background stats", "problem"]


def model_rows(ws: Workspace) -> pd.DataFrame:
    """One row per workspace model: model, model_hash (`model_hash_of`), memory layers, slots (None for
    a base model without memory), background stats (stored and made for this model hash), problem (why
    a directory is unusable, or statistics made for another model; '' when none)."""
    from smviz.errors import SmvizError
    from smviz.model import is_base_model_dir, read_memory_config

    rows = []
    for name in models(ws):
        d = ws.model(name)
        row: dict[str, Any] = {"model": name, "model_hash": None, "memory layers": None, "slots": None,
                               "background stats": False, "problem": ""}
        try:
            row["model_hash"] = model_hash_of(d)
            if not is_base_model_dir(d):
                memory = read_memory_config(d)
                row["memory layers"] = ", ".join(map(str, sorted(memory.layers)))
                row["slots"] = memory.n_slots
                stats = stats_of(d)
                if stats is not None and stats.model_hash not in (None, row["model_hash"]):
                    row["problem"] = f"background statistics of another model ({stats.model_hash}): make them again"
                row["background stats"] = stats is not None and not row["problem"]
        except SmvizError as err:
            row["problem"] = str(err)
        rows.append(row)
    return pd.DataFrame(rows, columns=MODEL_ROW_COLUMNS).astype({"slots": "Int64", "background stats": bool})


HEALTH_COLUMNS = {"used_share": "used share", "dead": "dead slots", "slots": "slots", "gini": "Gini",
                  "accesses": "reads", "kl_uniform": "KL from uniform", "slots_90": "slots with 90% of reads"}
"""`usage_metrics` keys → the columns of `health_rows`."""


def health_rows(ws: Workspace, names: list[str]) -> pd.DataFrame:
    """Memory health of each model in `names` with background statistics: one row per memory layer,
    model, layer and `SlotStats.usage(layer)` under the names of HEALTH_COLUMNS."""
    rows = []
    for name in names:
        stats = stats_of(ws.model(name))
        if stats is None:
            continue
        for layer in stats.layers:
            usage = stats.usage(layer)
            rows.append({"model": name, "layer": int(layer)} | {label: usage[key] for key, label in HEALTH_COLUMNS.items()})
    return pd.DataFrame(rows, columns=["model", "layer", *HEALTH_COLUMNS.values()])


@st.cache_data(show_spinner=False)
def trace_info(trace_dir: str, meta_stamp: int = 0) -> dict[str, Any]:
    """What the Overview shows of a trace, from its meta.json (`Trace.load(verify=False)`: the shards'
    sizes are checked, nothing is hashed or read): documents, tokens, accesses, layers, n_slots,
    model_hash, source. `meta_stamp`: the meta.json's mtime."""
    from smviz.trace import Trace

    t = Trace.load(trace_dir, verify=False)
    return {"documents": t.n_docs, "tokens": t.n_tokens, "accesses": t.n_accesses, "layers": t.layers,
            "n_slots": t.n_slots, "model_hash": t.model_hash, "source": (t.meta.get("source") or {}).get("name", "")}


def trace_rows(ws: Workspace) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """(one row per trace: trace, documents, tokens, accesses, layers, model_hash, source, problem;
    {trace name: `trace_info`} of the traces that load)."""
    from smviz.errors import SmvizError

    rows, infos = [], {}
    for name in traces(ws):
        d = ws.trace(name)
        try:
            info = infos[name] = trace_info(str(d), stamp(d / META_FILE))
            rows.append({"trace": name, **{k: info[k] for k in ("documents", "tokens", "accesses")},
                         "layers": ", ".join(map(str, info["layers"])), "model_hash": info["model_hash"],
                         "source": info["source"], "problem": ""})
        except SmvizError as err:
            rows.append({"trace": name, "problem": str(err)})
    columns = ["trace", "documents", "tokens", "accesses", "layers", "model_hash", "source", "problem"]
    return pd.DataFrame(rows, columns=columns), infos


@st.cache_data(show_spinner="Counting the trace's reads…")
def trace_counts(trace_dir: str, layer: int, meta_stamp: int = 0) -> np.ndarray:
    """Reads per slot of one memory layer of a trace (`Trace.slot_counts`), cached per meta.json mtime."""
    from smviz.trace import Trace

    return Trace.load(trace_dir, verify=False).slot_counts(layer)


def counts_of_trace(trace_dir: str | os.PathLike, layer: int) -> np.ndarray:
    return trace_counts(str(trace_dir), int(layer), stamp(Path(trace_dir) / META_FILE))


SPECIFIC_COLUMNS = ["rank", "slot", "reads", "tf", "df", "score"]


def specific_slots(trace_dir: str | os.PathLike, model_dir: str | os.PathLike, layer: int, n: int = HOME_TOP) -> pd.DataFrame:
    """The `n` slots most specific to a trace against the model's background: its reads of memory
    layer `layer` ranked by TF-IDF with `smviz.stats.top_slots` (THE ranking, the one sparse finetuning
    selects by; `smviz.analysis.tfidf_table` gives the same ranks). Columns: rank (1 = best), slot,
    reads (in the trace), tf, df (background document frequency), score."""
    import torch

    from smviz.stats import top_slots

    counts = counts_of_trace(trace_dir, layer)
    stats = stats_of(model_dir)
    if stats is None or counts.sum() == 0:
        return pd.DataFrame(columns=SPECIFIC_COLUMNS)
    slots, scores = top_slots(torch.from_numpy(counts), stats, int(layer), n)
    ids = slots.numpy().astype(np.int64)
    return pd.DataFrame({"rank": np.arange(1, len(ids) + 1), "slot": ids, "reads": counts[ids],
                         "tf": counts[ids] / counts.sum(), "df": stats.df[stats.layer_index(int(layer))][slots].numpy(),
                         "score": scores.numpy()})[SPECIFIC_COLUMNS]


RUN_ROW_COLUMNS = ["run", "method", "stream", "finished", "steps", "items", "top_t", "base model",
                   "learning EM", "known EM start", "known EM end", "known EM drop", "known EM relative drop", "problem"]


def run_rows(ws: Workspace, model_names: dict[str, str]) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """(one row per run — run, method, stream, finished, steps, items, top_t, base model (its workspace
    name by hash in `model_names` {hash: name}, else the hash), learning EM (the summary's learning_em
    end), known EM start / end / drop (start − end) / relative drop (the summary's), problem — ; {run
    name: its config} for the runs that read). Read from config.json and summary.json only
    (`smviz.train.rundir.FinetuneRunDir`): method and stream as `smviz.analysis.Run` reads them."""
    from smviz.errors import SmvizError
    from smviz.train.rundir import FinetuneRunDir

    rows, configs = [], {}
    for name in runs(ws):
        rd = FinetuneRunDir(ws.run(name))
        try:
            identity = rd.read_identity()
            summary = rd.summary()
        except (SmvizError, ValueError) as err:
            rows.append({"run": name, "finished": False, "problem": str(err)})
            continue
        config = configs[name] = dict(identity.get("config") or {})
        s = summary or {}
        metrics = s.get("metrics") or {}
        learn, known = metrics.get("learning_em") or {}, metrics.get("known_em") or {}
        start, end = known.get("start"), known.get("end")
        base = identity.get("base_model_hash")
        rows.append({
            "run": name, "method": config.get("method"), "stream": (identity.get("stream") or {}).get("kind", "facts"),
            "finished": summary is not None, "steps": s.get("steps"), "items": s.get("facts"), "top_t": config.get("top_t"),
            "base model": model_names.get(base, base), "learning EM": learn.get("end"), "known EM start": start,
            "known EM end": end, "known EM drop": None if start is None or end is None else start - end,
            "known EM relative drop": known.get("relative_drop"), "problem": "",
        })
    return pd.DataFrame(rows, columns=RUN_ROW_COLUMNS), configs


@st.cache_data(show_spinner="Diffing the run's final model against its base model…")
def changed_slots(run_dir: str, base_dir: str, summary_stamp: int = 0) -> pd.DataFrame:
    """Every value row a finished run changed, by layer then ‖ΔV‖ descending (`smviz.analysis.
    diff_run_model(...).slots`: loads the base and the final model)."""
    from smviz.analysis import diff_run_model

    return diff_run_model(run_dir, base_dir).slots


def entity_slots(trace_dir: str | os.PathLike, data_dir: str | os.PathLike, n: int = HOME_TOP) -> pd.DataFrame:
    """The `n` slots of a trace most enriched for entity tokens: `load_entities`' slot entity profile
    (spaCy, Fisher exact test, Benjamini–Hochberg) by q_value ascending, then log_odds descending and
    slot. Columns: slot, reads, entity_mass_share, top1, log_odds, q_value."""
    _, _, profile = load_entities(str(trace_dir), str(data_dir))
    columns = ["slot", "reads", "entity_mass_share", "top1", "log_odds", "q_value"]
    if profile.empty:
        return pd.DataFrame(columns=columns)
    ranked = profile.sort_values(["q_value", "log_odds", "slot"], ascending=[True, False, True], kind="stable")
    return ranked[columns].head(n).reset_index(drop=True)


def trace_usage(trace_dir: str | os.PathLike, layer: int) -> tuple[dict[str, float], np.ndarray]:
    """(`Trace.usage(layer)`, `Trace.slot_counts(layer)`) of a trace, from the cached counts."""
    import torch

    from smviz.usage import usage_metrics

    counts = counts_of_trace(trace_dir, layer)
    return usage_metrics(torch.from_numpy(counts)), counts


def run_stamp(ws: Workspace, name: str) -> int:
    """mtime of a run's summary.json (0 while unfinished): the cache key of what its final model gives."""
    from smviz.train.rundir import SUMMARY

    return stamp(ws.run(name) / SUMMARY)


def summary_only_note(trace_name: str, what: str) -> str:
    """What a page says where it needs every read and the trace keeps per-slot summaries only."""
    return (f"{what} needs every read, and trace {md(trace_name)} was recorded with --summary-only (per-slot summaries, "
            "not every read): record it again without --summary-only, or open its slots on the Slot page.")
