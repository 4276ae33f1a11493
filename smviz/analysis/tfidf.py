"""TF-IDF views of slots: for any set of reads (a batch, a fact, a run step, a trace subset), every
read slot's count, tf, background df and idf, score, rank and whether it was selected — computed with
exactly the arithmetic of `smviz.stats.tfidf` and ranked by `smviz.stats.rank`, as sparse finetuning's
tf-idf rule ranks, so the ranks here are the ranks training used — optionally against a second background.

Where the counts come from: `batch_slot_counts` (one forward of a model, padding excluded),
`trace_slot_counts` (rows or documents of a trace), `step_slot_counts` (a run step's batch rebuilt
from the run's config and facts). `step_table` reads what a run stored for a step without a model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from smviz.errors import AnalysisError
from smviz.stats import SlotStats, idf, rank, tfidf

if TYPE_CHECKING:
    from smviz.analysis.runs import Run
    from smviz.data.facts import Fact
    from smviz.model import MemoryModel
    from smviz.trace import Trace

TABLE_COLUMNS = ("slot", "count", "tf", "df", "idf", "score", "rank", "selected")
OTHER_COLUMNS = ("df_other", "idf_other", "score_other", "rank_other")
STEP_COLUMNS = ("step", "fact_id", "layer", "rank", "slot", "tf", "df", "score", "selected")


# --------------------------------------------------------------------------- the table


def _counts_tensor(counts: Any, n_slots: int) -> torch.Tensor:
    c = counts.detach().cpu() if isinstance(counts, torch.Tensor) else torch.as_tensor(np.asarray(counts))
    if c.dim() != 1 or c.shape[0] != n_slots:
        raise AnalysisError(f"counts must be a vector of length {n_slots} (one per slot), got shape {tuple(c.shape)}")
    if c.dtype.is_floating_point or c.dtype == torch.bool:
        raise AnalysisError(f"counts must be integers (reads per slot), got {c.dtype}")
    c = c.to(torch.int64)
    if bool((c < 0).any()):
        raise AnalysisError("counts must be >= 0")
    return c


def tfidf_table(
    counts: Any,
    stats: SlotStats,
    layer: int,
    *,
    top_t: int | None = None,
    selected: Iterable[int] | None = None,
    other: SlotStats | None = None,
) -> pd.DataFrame:
    """Every slot the reads touched (count > 0), ranked as sparse finetuning ranks them.

    `counts`: reads per slot of memory block `layer` (length N, integers; numpy or torch), e.g. from
    `batch_slot_counts`. `stats`: the background (`SlotStats`). `selected` is true for rank <= `top_t`
    (the paper's top-t trainable set) or for the slot ids in `selected` (e.g. what a run stored); at most
    one of them; neither: all false. `other`: a second background to compare with.

    Columns (one row per read slot, sorted by rank):
    slot (int64), count (int64 reads), tf (float64 count / Σ counts), df (int64 background document
    frequency), idf (float64 log((|B|+1)/(df+1))), score (float64 tf·idf, bit-identical to
    `smviz.stats.tfidf` and the tf-idf selection rule), rank (int64, 1 = best; `smviz.stats.rank`: score
    descending, ties to the lower slot id), selected (bool); with `other`: df_other, idf_other, score_other,
    rank_other (the same against `other`)."""
    if top_t is not None and selected is not None:
        raise AnalysisError("give top_t or selected, not both")
    if top_t is not None and top_t < 0:
        raise AnalysisError(f"top_t must be >= 0, got {top_t}")
    c = _counts_tensor(counts, stats.n_slots)
    row = stats.layer_index(layer)
    read = torch.nonzero(c > 0).flatten()  # ascending ids
    if len(read) == 0:
        raise AnalysisError("the counts hold no reads; nothing to rank")
    df = stats.df[row]
    scores = tfidf(c, df, stats.n_docs)
    slots = read[rank(scores[read])]
    total = c.sum()
    n = len(slots)
    out = pd.DataFrame({
        "slot": slots.numpy().astype(np.int64),
        "count": c[slots].numpy(),
        "tf": (c[slots].double() / total).numpy(),
        "df": df[slots].numpy(),
        "idf": idf(df[slots], stats.n_docs).numpy(),
        "score": scores[slots].numpy(),
        "rank": np.arange(1, n + 1, dtype=np.int64),
    })
    if top_t is not None:
        out["selected"] = out["rank"] <= top_t
    elif selected is not None:
        chosen = np.asarray(list(selected), dtype=np.int64)
        out["selected"] = np.isin(out["slot"].to_numpy(), chosen)
    else:
        out["selected"] = False
    if other is not None:
        if other.n_slots != stats.n_slots:
            raise AnalysisError(f"the other background has {other.n_slots} slots, this one {stats.n_slots}")
        df2 = other.df[other.layer_index(layer)]
        scores2 = tfidf(c, df2, other.n_docs)
        rank2 = torch.empty(stats.n_slots, dtype=torch.int64)
        rank2[read[rank(scores2[read])]] = torch.arange(1, n + 1)
        out["df_other"] = df2[slots].numpy()
        out["idf_other"] = idf(df2[slots], other.n_docs).numpy()
        out["score_other"] = scores2[slots].numpy()
        out["rank_other"] = rank2[slots].numpy()
    return out


# --------------------------------------------------------------------------- where counts come from


def batch_slot_counts(model: MemoryModel, batch: Mapping[str, torch.Tensor], layer: int | None = None) -> np.ndarray:
    """Reads per slot (int64, length N) of memory block `layer` (default: the only one) in one forward
    of `model` on `batch` (input_ids, attention_mask, ...): every real token (attention mask 1), every
    head, every one of the top-k — what `smviz.stats.batch_counts` counts during finetuning. The model
    is run in eval mode (as finetuning runs it) under no_grad and left unchanged."""
    from smviz.record import AccessRecorder

    layer = model.resolve_layer(layer)
    n_slots = model.memory_config.n_slots
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()  # as finetuning runs: frozen normalisation statistics, no dropout
    try:
        with torch.no_grad(), AccessRecorder(model, layers=[layer]) as rec:
            model(**inputs)
    finally:
        model.train(was_training)
    counts = np.zeros(n_slots, dtype=np.int64)
    for b in rec.batches:
        counts += np.bincount(b.slots[:, b.layers.index(layer)].reshape(-1).astype(np.int64), minlength=n_slots)
    return counts


def trace_rows(trace: Trace, doc_ids: Iterable[str]) -> np.ndarray:
    """Token rows (int64, ascending) of the documents `doc_ids` of `trace`; unknown ids are refused."""
    wanted = list(dict.fromkeys(str(d) for d in doc_ids))
    if not wanted:
        raise AnalysisError("no document ids given")
    tokens = trace.tokens
    ids = tokens.column("doc_id")
    mask = pc.is_in(ids, value_set=pa.array(wanted, pa.string()))
    found = set(pc.unique(ids.filter(mask)).to_pylist())
    missing = [d for d in wanted if d not in found]
    if missing:
        raise AnalysisError(f"document ids {missing[:5]} are not in this trace")
    return np.sort(tokens.column("row").filter(mask).to_numpy().astype(np.int64))


def trace_slot_counts(
    trace: Trace, *, rows: Iterable[int] | None = None, doc_ids: Iterable[str] | None = None, layer: int | None = None
) -> np.ndarray:
    """Reads per slot (int64, length N) of memory block `layer` (default: the only one recorded) by the
    token rows `rows`, or by the tokens of documents `doc_ids` (e.g. ['F1:s0', 'F1:s1']), or by the whole
    trace when neither is given."""
    if rows is not None and doc_ids is not None:
        raise AnalysisError("give rows or doc_ids, not both")
    layer = trace.resolve_layer(layer)
    keep = trace_rows(trace, doc_ids) if doc_ids is not None else None
    if rows is not None:
        keep = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(keep) and (keep[0] < 0 or keep[-1] >= trace.n_tokens):
            raise AnalysisError(f"token rows must lie in [0, {trace.n_tokens}), got {keep[0]}..{keep[-1]}")
    counts = np.zeros(trace.n_slots, dtype=np.int64)
    for accesses in trace.iter_table("accesses"):
        lay = accesses.column("layer").to_numpy()
        slot = accesses.column("slot").to_numpy()
        m = lay == layer
        if keep is not None:
            m &= np.isin(accesses.column("token").to_numpy(), keep)
        counts += np.bincount(slot[m].astype(np.int64), minlength=trace.n_slots)
    return counts


def _step_rows(run: Run, step: int, layer: int | None) -> pd.DataFrame:
    steps = run.steps
    if layer is not None:
        layer = run.resolve_layer(layer)
    rows = steps[steps["step"] == step]
    if rows.empty:
        raise AnalysisError(f"run {run.path} has no step {step} (steps are 1-based: {int(steps['step'].min())}..{int(steps['step'].max())})")
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    return rows


def step_table(run: Run, step: int, layer: int | None = None) -> pd.DataFrame:
    """What run step `step` (1-based) stored: its selected slots best first, with the tf, background df
    and score training computed (float32 as stored). No model needed.

    Columns: step, fact_id, layer, rank (1 = best), slot, tf, df, score, selected (always true: only
    selected slots are stored; see `step_slot_counts` + `tfidf_table` for every read slot)."""
    rows = _step_rows(run, step, layer)
    parts = []
    for r in rows.itertuples(index=False):
        sel = np.asarray(r.selected, dtype=np.int64)
        parts.append(pd.DataFrame({
            "step": int(r.step), "fact_id": r.fact_id, "layer": int(r.layer), "rank": np.arange(1, len(sel) + 1, dtype=np.int64),
            "slot": sel, "tf": np.asarray(r.tf, dtype=np.float64), "df": np.asarray(r.df, dtype=np.int64),
            "score": np.asarray(r.score, dtype=np.float64), "selected": True,
        }))
    if not parts or not sum(len(p) for p in parts):
        raise AnalysisError(f"step {step} of run {run.path} selected no slots ({run.method} selects none)")
    return pd.concat(parts, ignore_index=True)[list(STEP_COLUMNS)]


def step_slot_counts(run: Run, step: int, model: MemoryModel, facts: Sequence[Fact], layer: int | None = None) -> np.ndarray:
    """Reads per slot of memory block `layer` in run step `step` (1-based), recomputed: the step's batch
    is rebuilt with `Stream` from the run's config and `facts` (the run's stream facts, by id), and
    `model` — the run's base model, loaded fresh; it is changed in place — is put into its state before
    the step (`Run.rebuild(model, step - 1)`). `tfidf_table(counts, stats, layer, top_t=run top_t)` then
    reproduces the step's stored selection."""
    from smviz.train.stream import Stream

    run.check_model(model)
    if model.tokenizer is None:
        raise AnalysisError("the model has no tokenizer; load it with MemoryModel.from_pretrained")
    n_steps = int(run.steps["step"].max())
    if not 1 <= step <= n_steps:
        raise AnalysisError(f"run {run.path} has steps 1..{n_steps}, not {step}")
    by_id = {f.id: f for f in facts}
    ids = run.identity["stream"]["ids"]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AnalysisError(f"facts {missing[:5]} of run {run.path}'s stream were not given")
    cfg = run.config
    stream = Stream([by_id[i] for i in ids], model.tokenizer, batch_size=cfg["batch_size"],
                    steps_per_item=cfg["steps_per_fact"], composition=cfg["composition"], seed=cfg["seed"])
    run.rebuild(model, step - 1)
    return batch_slot_counts(model, stream.batch(step - 1), layer)
