"""Overlap of slot sets: selections across the steps and facts of a run (Jaccard / overlap-coefficient
matrices, reuse, churn, overlap with the background's most-used slots), the paper's core sets and how
much of them the trainable set covers, and the same fact's selections in two runs (the minimum
trainable t at which a fact is learned is `smviz.analysis.min_t`). Every function returns a DataFrame with
documented columns (`core_set` returns the slot ids); bad input raises AnalysisError (a `layer=` that
names no memory layer: ConfigError, from `smviz.model.resolve_layer`).

Core set (paper §6, made concrete for a trace of a facts file, whose documents are 'FACT:s0', ... —
the fact's statements, i.e. paraphrases — and 'FACT:q0', ... — its questions as "Question: ...\\nAnswer:
ANSWER"): for one memory layer, every head and every one of the top-k,
    P = ∩ over the statements s of (slots read by any token of s),
    Q = ∪ over the Q/A documents q of (slots read by the tokens of q chosen by `part`),
    core = P ∩ Q,
where `part` is 'prompt' (default: the tokens that end at or before the end of "Answer:", i.e. what the
model reads when it is asked the question), 'answer' (the tokens after it) or 'all'. The paper has one
question per fact; with several, a slot counts when any of the questions reads it (the union)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from smviz.data.facts import QUESTION, STATEMENT, fact_doc_id, parse_fact_doc_id
from smviz.errors import AnalysisError
from smviz.stats import SlotStats, rank

if TYPE_CHECKING:
    from smviz.analysis.runs import Run
    from smviz.trace import Trace

ANSWER_MARK = "\nAnswer:"
PARTS = ("prompt", "answer", "all")


# --------------------------------------------------------------------------- set matrices


def _membership(sets: Mapping[Any, Iterable[int]] | Sequence[Iterable[int]]) -> tuple[list[Any], np.ndarray]:
    """Keys and the (n_sets, n_distinct_slots) 0/1 membership matrix (float64 for BLAS; exact below 2^53)."""
    items = list(sets.items()) if isinstance(sets, Mapping) else list(enumerate(sets))
    if not items:
        raise AnalysisError("no slot sets given")
    keys = [k for k, _ in items]
    arrays = [np.unique(np.asarray(list(v) if not isinstance(v, np.ndarray) else v, dtype=np.int64)) for _, v in items]
    empty = [k for k, a in zip(keys, arrays) if len(a) == 0]
    if empty:
        raise AnalysisError(f"slot sets {empty[:5]} are empty; overlap of an empty selection is undefined (drop them)")
    universe = np.unique(np.concatenate(arrays))
    m = np.zeros((len(arrays), len(universe)), dtype=np.float64)
    row = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
    m[row, np.searchsorted(universe, np.concatenate(arrays))] = 1.0
    return keys, m


def _intersections(sets) -> tuple[list[Any], np.ndarray, np.ndarray]:
    keys, m = _membership(sets)
    inter = np.rint(m @ m.T).astype(np.int64)
    sizes = np.diag(inter).copy()
    return keys, inter, sizes


def intersection_matrix(sets: Mapping[Any, Iterable[int]] | Sequence[Iterable[int]]) -> pd.DataFrame:
    """|A ∩ B| for every pair of slot sets (int64; the diagonal holds the sizes). Index and columns:
    the mapping's keys (or positions of a sequence)."""
    keys, inter, _ = _intersections(sets)
    return pd.DataFrame(inter, index=keys, columns=keys)


def jaccard_matrix(sets: Mapping[Any, Iterable[int]] | Sequence[Iterable[int]]) -> pd.DataFrame:
    """|A ∩ B| / |A ∪ B| for every pair of (non-empty) slot sets, float64, 1 on the diagonal. Index and
    columns: the mapping's keys (or positions). One matrix product of the membership matrix."""
    keys, inter, sizes = _intersections(sets)
    union = sizes[:, None] + sizes[None, :] - inter
    return pd.DataFrame(inter / union, index=keys, columns=keys)


def overlap_matrix(sets: Mapping[Any, Iterable[int]] | Sequence[Iterable[int]]) -> pd.DataFrame:
    """Overlap coefficient |A ∩ B| / min(|A|, |B|) for every pair of (non-empty) slot sets, float64."""
    keys, inter, sizes = _intersections(sets)
    return pd.DataFrame(inter / np.minimum(sizes[:, None], sizes[None, :]), index=keys, columns=keys)


# --------------------------------------------------------------------------- one run


def _layer_steps(run: Run, layer: int | None) -> tuple[int, pd.DataFrame]:
    layer = run.resolve_layer(layer)
    steps = run.steps
    steps = steps[steps["layer"] == layer].sort_values("step", kind="stable").reset_index(drop=True)
    if not sum(len(s) for s in steps["selected"]):
        raise AnalysisError(f"run {run.path} selected no slots in layer {layer} ({run.method} trains no value rows by selection)")
    return layer, steps


def _long(steps: pd.DataFrame, t: int | None = None) -> pd.DataFrame:
    """One row per (step, selected slot): step, fact_id, slot (the first `t` of each step when given)."""
    sel = [np.asarray(s, dtype=np.int64)[:t] for s in steps["selected"]]
    n = np.array([len(s) for s in sel])
    return pd.DataFrame({
        "step": np.repeat(steps["step"].to_numpy(), n),
        "fact_id": np.repeat(steps["fact_id"].to_numpy(), n),
        "slot": np.concatenate(sel) if len(sel) else np.zeros(0, np.int64),
    })


def selected_sets(run: Run, *, by: str = "step", layer: int | None = None, t: int | None = None) -> dict[Any, np.ndarray]:
    """Selected slot ids (sorted, unique) per step (`by="step"`) or per fact (`by="fact"`: union over the
    fact's steps), keeping only each step's best `t` when given (selections are stored best first, so
    this is the top-t set of a smaller t). Steps or facts that selected nothing are left out."""
    if by not in ("step", "fact"):
        raise AnalysisError(f"by must be 'step' or 'fact', got {by!r}")
    if t is not None and t < 1:
        raise AnalysisError(f"t must be >= 1, got {t}")
    _, steps = _layer_steps(run, layer)
    long = _long(steps, t)
    key = "step" if by == "step" else "fact_id"
    return {k: np.unique(g.to_numpy()) for k, g in long.groupby(key, sort=False)["slot"]}


def slot_reuse(run: Run, layer: int | None = None) -> pd.DataFrame:
    """How often each ever-selected slot was trained. Columns: slot, n_facts (distinct facts whose
    steps selected it), n_steps (steps that selected it), first_step, last_step. Sorted by n_facts,
    then n_steps descending, then slot."""
    _, steps = _layer_steps(run, layer)
    long = _long(steps)
    out = long.groupby("slot").agg(n_facts=("fact_id", "nunique"), n_steps=("step", "size"),
                                   first_step=("step", "min"), last_step=("step", "max")).reset_index()
    out = out.astype({"slot": np.int64, "n_facts": np.int64, "n_steps": np.int64, "first_step": np.int64, "last_step": np.int64})
    return out.sort_values(["n_facts", "n_steps", "slot"], ascending=[False, False, True], kind="stable").reset_index(drop=True)


def background_top(stats: SlotStats, layer: int, top: int) -> np.ndarray:
    """The `top` most-read slots of block `layer` in the background (by `stats.counts`, ranked by
    `smviz.stats.rank`: ties to the lower id), as int64 ids in that order."""
    if top < 1:
        raise AnalysisError(f"top must be >= 1, got {top}")
    counts = stats.counts[stats.layer_index(layer)]
    return rank(counts, top).numpy().astype(np.int64)


def background_overlap(run: Run, stats: SlotStats, *, top: int = 1000, by: str = "step", layer: int | None = None) -> pd.DataFrame:
    """Share of each step's (or fact's) trained slots that are among the background's `top` most-read
    slots (`background_top`). Columns: step (or fact_id), n_selected, n_in_top, share (n_in_top /
    n_selected), expected (top / N: the share of a uniformly random selection)."""
    if stats.model_hash is not None and stats.model_hash != run.base_model_hash:
        raise AnalysisError(f"the statistics are of model {stats.model_hash}, run {run.path} started from {run.base_model_hash}")
    layer, _ = _layer_steps(run, layer)
    top_ids = background_top(stats, layer, top)
    sets = selected_sets(run, by=by, layer=layer)
    key = "step" if by == "step" else "fact_id"
    n_sel = np.array([len(s) for s in sets.values()], dtype=np.int64)
    n_in = np.array([int(np.isin(s, top_ids).sum()) for s in sets.values()], dtype=np.int64)
    return pd.DataFrame({key: list(sets), "n_selected": n_sel, "n_in_top": n_in, "share": n_in / n_sel,
                         "expected": min(top, stats.n_slots) / stats.n_slots})


def churn(run: Run, layer: int | None = None) -> pd.DataFrame:
    """Step-to-step change of the selected set S_t. Columns: step, fact_id, new_fact (the fact differs
    from the previous step's), n_selected |S_t|, churn |S_t \\ S_{t-1}| / |S_t|, jaccard with S_{t-1}
    (both NaN on the first step), n_new (slots never selected in an earlier step), new_share
    (n_new / |S_t|). Steps that selected nothing have NaN ratios."""
    _, steps = _layer_steps(run, layer)
    sel = [np.unique(np.asarray(s, dtype=np.int64)) for s in steps["selected"]]
    n = np.array([len(s) for s in sel], dtype=np.int64)
    step_no = steps["step"].to_numpy()
    # vectorised over steps: each (step position, slot) pair once; its first selection and its previous one
    pos = np.repeat(np.arange(len(sel)), n)
    slot = np.concatenate(sel)
    order = np.lexsort((pos, slot))  # by slot, then step position
    s_slot, s_pos = slot[order], pos[order]
    same = np.r_[False, s_slot[1:] == s_slot[:-1]]
    prev_pos = np.where(same, np.r_[-1, s_pos[:-1]], -1)
    kept = np.bincount(s_pos[(prev_pos >= 0) & (prev_pos == s_pos - 1)], minlength=len(sel))  # |S_t ∩ S_{t-1}|
    new = np.bincount(s_pos[~same], minlength=len(sel))  # first time selected
    prev_n = np.r_[0, n[:-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        churn_ = np.where(n > 0, (n - kept) / np.where(n > 0, n, 1), np.nan)
        union = n + prev_n - kept
        jac = np.where(union > 0, kept / np.where(union > 0, union, 1), np.nan)
        new_share = np.where(n > 0, new / np.where(n > 0, n, 1), np.nan)
    churn_[0], jac[0] = np.nan, np.nan
    fact = steps["fact_id"].to_numpy()
    return pd.DataFrame({
        "step": step_no.astype(np.int64), "fact_id": fact, "new_fact": np.r_[True, fact[1:] != fact[:-1]],
        "n_selected": n, "churn": churn_, "jaccard": jac, "n_new": new.astype(np.int64), "new_share": new_share,
    })


# --------------------------------------------------------------------------- core sets


class _TraceView:
    """One layer of a trace, indexed for per-document slot sets: accesses sorted by token row."""

    def __init__(self, trace: Trace, layer: int | None) -> None:
        self.layer = trace.resolve_layer(layer)
        tok = trace.tokens
        self.tokens = pd.DataFrame({c: tok.column(c).to_numpy(zero_copy_only=False) for c in ("row", "doc_id", "position", "text", "end")})
        toks, slots = [], []
        for accesses in trace.iter_table("accesses"):
            m = accesses.column("layer").to_numpy() == self.layer
            toks.append(accesses.column("token").to_numpy()[m].astype(np.int64))
            slots.append(accesses.column("slot").to_numpy()[m].astype(np.int64))
        tok_a = np.concatenate(toks) if toks else np.zeros(0, np.int64)
        slot_a = np.concatenate(slots) if slots else np.zeros(0, np.int64)
        order = np.argsort(tok_a, kind="stable")
        self.tok, self.slot = tok_a[order], slot_a[order]
        self.by_doc = {d: g for d, g in self.tokens.groupby("doc_id", sort=False)}
        self.fact_doc_ids = {d: p for d in self.by_doc if (p := parse_fact_doc_id(d)) is not None}  # {doc id: FactDocId}

    def slots_of_rows(self, rows: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(self.tok, rows, "left")
        hi = np.searchsorted(self.tok, rows, "right")
        if not len(rows):
            return np.zeros(0, np.int64)
        idx = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        return np.unique(self.slot[idx])

    def fact_docs(self, fact_id: str) -> tuple[list[str], list[str]]:
        """The fact's statement and question documents in this trace, each in index order."""
        mine = sorted(((p, d) for d, p in self.fact_doc_ids.items() if p.fact_id == fact_id), key=lambda x: x[0].index)
        return [d for p, d in mine if p.kind == STATEMENT], [d for p, d in mine if p.kind == QUESTION]

    def question_rows(self, doc_id: str, part: str) -> np.ndarray:
        g = self.by_doc[doc_id].sort_values("position", kind="stable")
        rows = g["row"].to_numpy().astype(np.int64)
        if part == "all":
            return rows
        texts = g["text"].tolist()
        end = g["end"].to_numpy().astype(np.int64)
        if (end < 0).any():  # unknown offsets: the token texts tile the document
            end = np.cumsum([len(t) for t in texts])
        text = "".join(texts)
        cut = text.rfind(ANSWER_MARK)
        if cut < 0:
            raise AnalysisError(f"document {doc_id!r} has no {ANSWER_MARK.strip()!r} line; it is not a Q/A document of a facts file")
        prompt = end <= cut + len(ANSWER_MARK)
        return rows[prompt] if part == "prompt" else rows[~prompt]


def _core(view: _TraceView, fact_id: str, part: str) -> dict[str, Any]:
    if part not in PARTS:
        raise AnalysisError(f"part must be one of {list(PARTS)}, got {part!r}")
    statements, questions = view.fact_docs(fact_id)
    if not statements and not questions:
        raise AnalysisError(f"fact {fact_id!r} has no documents ({fact_doc_id(fact_id, STATEMENT, 0)!r}, "
                            f"{fact_doc_id(fact_id, QUESTION, 0)!r}, ...) in this trace; record the facts file that holds it")
    if not statements or not questions:
        missing = "statement" if not statements else "question"
        raise AnalysisError(f"fact {fact_id!r} has no {missing} documents in this trace; a core set needs both")
    p: np.ndarray | None = None
    for d in statements:
        s = view.slots_of_rows(view.by_doc[d]["row"].to_numpy().astype(np.int64))
        p = s if p is None else np.intersect1d(p, s, assume_unique=True)
    q = np.unique(np.concatenate([view.slots_of_rows(view.question_rows(d, part)) for d in questions]))
    return {"statements": statements, "questions": questions, "P": p, "Q": q, "core": np.intersect1d(p, q, assume_unique=True)}


def core_set(trace: Trace, fact_id: str, *, layer: int | None = None, part: str = "prompt") -> np.ndarray:
    """The core set of fact `fact_id` in memory block `layer` (default: the only one recorded): sorted
    int64 slot ids, as defined in the module docstring (statements' intersection ∩ questions' union;
    `part` picks the question tokens: 'prompt', 'answer' or 'all')."""
    return _core(_TraceView(trace, layer), fact_id, part)["core"]


def core_sets(trace: Trace, fact_ids: Iterable[str] | None = None, *, layer: int | None = None, part: str = "prompt") -> pd.DataFrame:
    """Core sets of several facts (default: every fact with statement and question documents in the trace).
    Columns: fact_id, n_statements, n_questions, paraphrase_size (|P|: slots read by every statement),
    question_size (|Q|), core_size, core (array of slot ids)."""
    view = _TraceView(trace, layer)
    if fact_ids is None:
        kinds: dict[str, set[str]] = {}
        for p in view.fact_doc_ids.values():
            kinds.setdefault(p.fact_id, set()).add(p.kind)
        fact_ids = [f for f, k in kinds.items() if k == {STATEMENT, QUESTION}]
        if not fact_ids:
            raise AnalysisError("this trace holds no fact with both statement ('FACT:s0') and question ('FACT:q0') documents")
    rows = []
    for f in fact_ids:
        c = _core(view, f, part)
        rows.append({"fact_id": f, "n_statements": len(c["statements"]), "n_questions": len(c["questions"]),
                     "paraphrase_size": len(c["P"]), "question_size": len(c["Q"]), "core_size": len(c["core"]), "core": c["core"]})
    return pd.DataFrame(rows, columns=["fact_id", "n_statements", "n_questions", "paraphrase_size", "question_size", "core_size", "core"])


def check_same_model(trace: Trace, run: Run) -> None:
    """Refuse a trace recorded with another model than the run's base model."""
    if trace.model_hash is None or trace.model_hash != run.base_model_hash:
        raise AnalysisError(
            f"the trace was recorded with model {trace.model_hash}, but run {run.path} started from model "
            f"{run.base_model_hash}; record the trace with the run's base model (`smviz record --model ...`)")


def core_coverage(run: Run, trace: Trace, *, fact_ids: Iterable[str] | None = None, layer: int | None = None,
                  part: str = "prompt", t: int | None = None) -> pd.DataFrame:
    """Per fact of the run (or of `fact_ids`): how much of its core set (from `trace`, recorded with the
    run's base model) the run trained — the union over the fact's steps of the selected slots, each
    step's best `t` only when given (default: all the run selected, i.e. its top_t).

    Columns: fact_id, core_size, trained_size, covered (|core ∩ trained|), coverage (covered /
    core_size; NaN for an empty core), trained_in_core (covered / trained_size)."""
    check_same_model(trace, run)
    layer, _ = _layer_steps(run, layer)
    trained = selected_sets(run, by="fact", layer=layer, t=t)
    if fact_ids is None:
        fact_ids = list(trained)
    else:
        fact_ids = list(fact_ids)
        unknown = [f for f in fact_ids if f not in trained]
        if unknown:
            raise AnalysisError(f"facts {unknown[:5]} were not trained (or selected nothing) in run {run.path}")
    view = _TraceView(trace, layer)
    rows = []
    for f in fact_ids:
        core = _core(view, f, part)["core"]
        tr = trained[f]
        covered = len(np.intersect1d(core, tr, assume_unique=True))
        rows.append({"fact_id": f, "core_size": len(core), "trained_size": len(tr), "covered": covered,
                     "coverage": covered / len(core) if len(core) else np.nan, "trained_in_core": covered / len(tr)})
    return pd.DataFrame(rows, columns=["fact_id", "core_size", "trained_size", "covered", "coverage", "trained_in_core"])


# --------------------------------------------------------------------------- two runs


def cross_run(run_a: Run, run_b: Run, *, layer: int | None = None) -> pd.DataFrame:
    """The same fact's selected slots (union over its steps) in two runs of the same base model (two
    methods, two seeds, two t). Columns, per fact selected in both (in run_a's order): fact_id, n_a, n_b,
    intersection, jaccard, overlap (|A ∩ B| / min(|A|, |B|))."""
    if run_a.base_model_hash != run_b.base_model_hash:
        raise AnalysisError(f"run {run_a.path} started from model {run_a.base_model_hash}, run {run_b.path} from "
                                 f"{run_b.base_model_hash}; slot ids of different models do not correspond")
    a = selected_sets(run_a, by="fact", layer=layer)
    b = selected_sets(run_b, by="fact", layer=layer)
    common = [f for f in a if f in b]
    if not common:
        raise AnalysisError(f"runs {run_a.path} and {run_b.path} have no fact in common")
    n_a = np.array([len(a[f]) for f in common], dtype=np.int64)
    n_b = np.array([len(b[f]) for f in common], dtype=np.int64)
    inter = np.array([len(np.intersect1d(a[f], b[f], assume_unique=True)) for f in common], dtype=np.int64)
    return pd.DataFrame({"fact_id": common, "n_a": n_a, "n_b": n_b, "intersection": inter,
                         "jaccard": inter / (n_a + n_b - inter), "overlap": inter / np.minimum(n_a, n_b)})
