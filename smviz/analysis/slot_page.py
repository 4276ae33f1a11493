"""The library side of one memory slot's page (a Neuronpedia-like view): where in the heads' top-k its
reads land (`rank_histogram`), its reading tokens by weight interval (`weight_buckets`, the sae_vis
"quantile intervals"), its neighbours by co-reading, value cosine and shared sub-key, the reads over the
(i1, i2) key grid (`key_map`), a one-line label, a summary card, and the inverted search token → the
slots that read it (`token_search`). Vectorised over slots (numpy / Arrow); every function returns a
DataFrame or a plain dict with documented columns / keys; bad input raises `AnalysisError`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from smviz.analysis.entity_stats import profile_entry
from smviz.errors import AnalysisError, RunError
from smviz.trace.summary import SummarySlotIndex

if TYPE_CHECKING:
    from smviz.analysis.runs import Run
    from smviz.model import MemoryModel
    from smviz.stats import SlotStats
    from smviz.trace import SlotIndex, Trace

BUCKET_COLUMNS = ["bucket", "bucket_lo", "bucket_hi", "bucket_tokens", "row", "doc", "doc_id", "position", "token",
                  "weight", "reads", "left", "right", "window", "focus", "next_token"]
NEIGHBOUR_COLUMNS = ["slot", "n_both", "readers", "jaccard", "pmi"]
SUBKEY_COLUMNS = ["relation", "slot", "i1", "i2", "reads"]
SEARCH_COLUMNS = ["slot", "reads", "tokens", "weight"]


def _check_slot(slot: Any, n: int) -> int:
    if isinstance(slot, bool) or not (isinstance(slot, (int, np.integer)) and 0 <= slot < n):
        raise AnalysisError(f"slot {slot!r} is out of range: the memory has {n:,} slots (0..{n - 1})")
    return int(slot)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) and value >= minimum):
        raise AnalysisError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _order(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions sorting `values` descending, ties to the lower id."""
    return np.lexsort((ids, -values))


# --------------------------------------------------------------------------- one slot's reads


def rank_histogram(index: SlotIndex, slot: int, layer: int | None = None) -> pd.DataFrame:
    """How many of the slot's reads were at each place of the head's top-k. Columns: rank (1..knn,
    1 = the head's highest score), reads (int64). A dead slot: every count 0."""
    slot = _check_slot(slot, index.trace.n_slots)
    ranks = index.slot_ranks(slot, layer).astype(np.int64)
    k = max(int(index.trace.meta["memory"]["knn"]), int(ranks.max()) + 1 if len(ranks) else 0)
    return pd.DataFrame({"rank": np.arange(1, k + 1, dtype=np.int64), "reads": np.bincount(ranks, minlength=k)})


def _interval_label(lo: float, hi: float, width: float) -> str:
    digits = 2 if width <= 0 or width >= 0.01 else int(np.ceil(-np.log10(width))) + 1
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def weight_buckets(
    index: SlotIndex, slot: int, layer: int | None = None, *, buckets: int = 10, per_bucket: int = 5,
    random: int = 5, window: int = 8, seed: int = 0,
) -> pd.DataFrame:
    """The slot's reading tokens by weight interval (sae_vis / Anthropic's "quantile intervals"). A
    token's weight is the sum of its reads of the slot over heads (as `SlotIndex.contexts`).

    Rows, in this order: bucket "top" — the `per_bucket` strongest tokens (ties to the earlier row);
    then the `buckets` equal-width intervals between the smallest and the largest weight, highest first
    (interval b holds lo_b <= weight < hi_b, the last one also weight == max), each with `per_bucket`
    tokens drawn from it without replacement (fewer if it holds fewer, none if empty; an interval may
    repeat a "top" token); then bucket "random" — `random` tokens drawn uniformly from all readers.
    Draws use numpy's default_rng(seed): the same seed gives the same rows. Within a bucket rows go by
    weight descending, ties to the earlier row.

    Columns: bucket ("top", an interval label like "0.31–0.38", or "random"), bucket_lo, bucket_hi
    (the interval's bounds; "top": the weights of its weakest and strongest token; "random": the min
    and max over all readers), bucket_tokens (reading tokens in the bucket: the interval's size; "top"
    and "random": the number shown / all readers), then row, doc, doc_id, position, token, weight,
    reads, left, right, window, focus, next_token as `SlotIndex.contexts` gives them. A dead slot:
    no rows."""
    slot = _check_slot(slot, index.trace.n_slots)
    buckets = _check_int("buckets", buckets, 1)
    per_bucket, random = _check_int("per_bucket", per_bucket, 0), _check_int("random", random, 0)
    window = _check_int("window", window, 0)
    rows, weight, reads = index.readers(slot, layer)
    if len(rows) == 0:
        return _empty(BUCKET_COLUMNS)
    rng = np.random.default_rng(seed)
    lo, hi = float(weight.min()), float(weight.max())
    edges = np.linspace(lo, hi, buckets + 1)
    member = np.clip(np.searchsorted(edges, weight, side="right") - 1, 0, buckets - 1)
    sizes = np.bincount(member, minlength=buckets)

    top = _order(weight, rows)[:per_bucket]
    by_bucket = np.lexsort((rng.random(len(rows)), -member))  # highest interval first, random order inside
    place = np.arange(len(rows)) - np.searchsorted(-member[by_bucket], -member[by_bucket], side="left")
    drawn = by_bucket[place < per_bucket]
    drawn = drawn[np.lexsort((rows[drawn], -weight[drawn], -member[drawn]))]
    sample = rng.choice(len(rows), size=min(random, len(rows)), replace=False)
    sample = sample[_order(weight[sample], rows[sample])]

    labels = np.array([_interval_label(edges[i], edges[i + 1], (hi - lo) / buckets) for i in range(buckets)], dtype=object)
    pick = np.concatenate([top, drawn, sample]).astype(np.int64)
    b, n_top, n_random = member[drawn], len(top), len(sample)

    def parts(first: Any, intervals: np.ndarray, last: Any) -> np.ndarray:
        return np.concatenate([np.full(n_top, first, dtype=intervals.dtype), intervals, np.full(n_random, last, dtype=intervals.dtype)])

    bucket = parts("top", labels[b], "random")
    bucket_lo = parts(weight[top].min() if n_top else lo, edges[b], lo)
    bucket_hi = parts(weight[top].max() if n_top else hi, edges[b + 1], hi)
    bucket_tokens = parts(n_top, sizes[b], len(rows))

    df = index.context_rows(rows[pick], window)
    df.insert(5, "weight", weight[pick])
    df.insert(6, "reads", reads[pick])
    for i, (name, values) in enumerate(zip(BUCKET_COLUMNS[:4], (bucket, bucket_lo, bucket_hi, bucket_tokens))):
        df.insert(i, name, values)
    return df[BUCKET_COLUMNS]


def slot_label(index: SlotIndex, slot: int, layer: int | None = None, *, n: int = 4) -> str:
    """A one-line heuristic label, e.g. "reads at: ofi · Kofi · Accra · …": the first `n` distinct
    whitespace-stripped texts of the slot's reading tokens taken by weight (summed over heads,
    descending, ties to the earlier row), empty texts skipped, "…" when more remain. '' for a dead slot
    (or one whose readers have no text)."""
    slot, n = _check_slot(slot, index.trace.n_slots), _check_int("n", n, 1)
    if isinstance(index, SummarySlotIndex):  # a summary-only trace: its top readers are all it has
        rows, weight, _ = index.top_readers(slot, index.keep, layer)
    else:
        rows, weight, _ = index.readers(slot, layer)
    if len(rows) == 0:
        return ""
    texts = pc.utf8_trim_whitespace(index.token_columns()["text"].take(pa.array(rows[_order(weight, rows)])))
    distinct = [t for t in pd.unique(texts.to_pandas()) if t]
    if not distinct:
        return ""
    return "reads at: " + " · ".join(distinct[:n]) + (" · …" if len(distinct) > n else "")


# --------------------------------------------------------------------------- neighbours


def co_read_neighbours(index: SlotIndex, slot: int, layer: int | None = None, *, top: int = 20) -> pd.DataFrame:
    """The slots read by the same tokens as `slot`, over ALL its reading tokens, counting tokens (a
    token reading a slot in several heads counts once). With n_s, n_s' the tokens reading each slot,
    n_both those reading both and N the trace's tokens: jaccard = n_both / (n_s + n_s' − n_both), pmi =
    log(n_both · N / (n_s · n_s')).

    Columns: slot, n_both, readers (n_s'), jaccard, pmi; the `top` with the highest jaccard (ties to
    the lower id), only slots with n_both > 0, `slot` itself left out. attrs: slot, readers (n_s),
    n_tokens (N)."""
    n = index.trace.n_slots
    slot, top = _check_slot(slot, n), _check_int("top", top, 1)
    layer = index.trace.resolve_layer(layer)
    rows, _, _ = index.readers(slot, layer)
    per_slot, n_tokens = index.reading_tokens(layer), index.trace.n_tokens
    if len(rows) == 0:
        out = _empty(NEIGHBOUR_COLUMNS)
    else:
        reads = index.reads_of_rows(rows, layer=layer)
        pairs = np.unique(reads["row"].to_numpy(np.int64) * n + reads["slot"].to_numpy(np.int64))
        both = np.bincount(pairs % n, minlength=n)
        both[slot] = 0
        cand = np.flatnonzero(both)
        jaccard = both[cand] / (len(rows) + per_slot[cand] - both[cand])
        pmi = np.log(both[cand] * float(n_tokens) / (len(rows) * per_slot[cand].astype(np.float64)))
        keep = _order(jaccard, cand)[:top]
        out = pd.DataFrame({"slot": cand[keep].astype(np.int64), "n_both": both[cand][keep], "readers": per_slot[cand][keep],
                            "jaccard": jaccard[keep], "pmi": pmi[keep]})
    out.attrs.update(slot=slot, readers=len(rows), n_tokens=n_tokens)
    return out


@torch.no_grad()
def value_neighbours(model: MemoryModel, slot: int, layer: int | None = None, *, top: int = 20) -> pd.DataFrame:
    """The slots whose value rows point the most the same way as `slot`'s: cosine similarity of value
    rows (one matrix-vector product over the value table; norms clamped at 1e-8 as
    torch.nn.functional.cosine_similarity does), `slot` itself left out. Columns: slot, cosine
    (float64), value_norm (‖V[slot']‖); the `top` highest cosines, ties to the lower id."""
    layer = model.resolve_layer(layer)
    weight = model.memory_layers[layer].value_table.weight.detach()
    slot, top = _check_slot(slot, weight.shape[0]), _check_int("top", top, 1)
    values = weight.float()
    norms = values.norm(dim=1)
    cosine = (values @ values[slot]) / (norms.clamp_min(1e-8) * norms[slot].clamp_min(1e-8))
    cosine, norms_np = cosine.double().cpu().numpy(), norms.double().cpu().numpy()
    others = np.delete(np.arange(len(cosine)), slot)
    keep = others[_order(cosine[others], others)[:top]]
    return pd.DataFrame({"slot": keep.astype(np.int64), "cosine": cosine[keep], "value_norm": norms_np[keep]})


def key_map(counts: Any, n_keys: int) -> np.ndarray:
    """Reads per (i1, i2) sub-key pair, (n_keys, n_keys): `counts` (reads per slot, length n_keys²,
    numpy or torch, e.g. `Trace.slot_counts`) reshaped, slot id = i1 · n_keys + i2 (`smviz.memory`)."""
    n_keys = _check_int("n_keys", n_keys, 1)
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if c.ndim != 1 or len(c) != n_keys**2:
        raise AnalysisError(f"counts must be a vector of n_keys² = {n_keys**2:,} entries (one per slot) for n_keys={n_keys}, "
                            f"got shape {c.shape}")
    if not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)) or c.dtype == bool:
        raise AnalysisError(f"counts must be numbers (reads per slot), got {c.dtype}")
    if (c < 0).any():
        raise AnalysisError("counts must be >= 0")
    return c.reshape(n_keys, n_keys).copy()


def subkey_neighbours(trace_or_counts: Trace | Any, slot: int, n_keys: int | None = None, *, layer: int | None = None,
                      top: int = 10) -> pd.DataFrame:
    """The slots that share a sub-key with `slot`: those in its row of the key grid (the same first
    sub-key i1 = slot // n_keys) and those in its column (the same second sub-key i2 = slot % n_keys),
    each only where read, the `top` most read of each (ties to the lower id), `slot` left out.
    `trace_or_counts`: a Trace (its `slot_counts(layer)`; n_keys defaults to its memory's) or reads
    per slot (then n_keys is required). Columns: relation ('row i1' | 'column i2'), slot, i1, i2, reads."""
    if hasattr(trace_or_counts, "slot_counts"):
        recorded = int(trace_or_counts.meta["memory"]["n_keys"])
        if n_keys is not None and n_keys != recorded:
            raise AnalysisError(f"n_keys={n_keys} does not match the trace's memory (n_keys={recorded})")
        n_keys, counts = recorded, trace_or_counts.slot_counts(layer)
    elif n_keys is None:
        raise AnalysisError("give n_keys with slot counts (it is read from the memory config only for a Trace)")
    else:
        counts = trace_or_counts
    grid = key_map(counts, n_keys)
    slot, top = _check_slot(slot, n_keys**2), _check_int("top", top, 1)
    i1, i2 = divmod(slot, n_keys)
    ids = np.arange(n_keys)
    in_row = ids[(grid[i1] > 0) & (ids != i2)]
    in_row = in_row[_order(grid[i1, in_row], in_row)][:top]
    in_col = ids[(grid[:, i2] > 0) & (ids != i1)]
    in_col = in_col[_order(grid[in_col, i2], in_col)][:top]
    a = np.r_[np.full(len(in_row), i1), in_col].astype(np.int64)
    b = np.r_[in_row, np.full(len(in_col), i2)].astype(np.int64)
    return pd.DataFrame({"relation": ["row i1"] * len(in_row) + ["column i2"] * len(in_col), "slot": a * n_keys + b,
                         "i1": a, "i2": b, "reads": grid[a, b]}, columns=SUBKEY_COLUMNS)


# --------------------------------------------------------------------------- search and card


def token_search(index: SlotIndex, query: str, layer: int | None = None, *, match: str = "exact", top: int = 20) -> pd.DataFrame:
    """Token or string → the slots that read it most. The token rows whose text, stripped and
    case-insensitive, equals `query` (match="exact") or contains it (match="substring"); their reads of
    memory layer `layer` summed per slot. Columns: slot, reads (reads by those tokens), tokens (distinct
    such tokens reading it), weight (sum of the reads' weights); the `top` with the most weight, ties
    to the lower id. attrs: query, match, rows (how many token rows matched). No match: no rows."""
    if not isinstance(query, str) or not query.strip():
        raise AnalysisError(f"the query must be a non-empty string, got {query!r}")
    if match not in ("exact", "substring"):
        raise AnalysisError(f"match must be 'exact' or 'substring', got {match!r}")
    top = _check_int("top", top, 1)
    layer = index.trace.resolve_layer(layer)
    wanted = query.strip()
    texts = pc.utf8_trim_whitespace(index.token_columns()["text"])
    hit = (pc.equal(pc.utf8_lower(texts), wanted.lower()) if match == "exact"
           else pc.match_substring(texts, wanted, ignore_case=True))
    rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False)) if len(texts) else np.zeros(0, np.int64)
    out = _empty(SEARCH_COLUMNS)
    if len(rows):
        n = index.trace.n_slots
        reads = index.reads_of_rows(rows, layer=layer)
        slot = reads["slot"].to_numpy(np.int64)
        count = np.bincount(slot, minlength=n)
        weight = np.bincount(slot, weights=reads["weight"].to_numpy(np.float64), minlength=n)
        tokens = np.bincount(np.unique(reads["row"].to_numpy(np.int64) * n + slot) % n, minlength=n)
        read = np.flatnonzero(count)
        keep = read[_order(weight[read], read)][:top]
        out = pd.DataFrame({"slot": keep, "reads": count[keep], "tokens": tokens[keep], "weight": weight[keep]})
    out.attrs.update(query=query, match=match, rows=len(rows))
    return out


def _run_entry(run: Run, slot: int, layer: int, base_values: torch.Tensor | None, base_hash: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"run": str(run.path), "method": run.method, "best_rank": None, "steps_selected": 0,
                             "selected": False, "delta_norm": None}
    try:
        steps = run.steps
    except RunError:  # no steps written yet
        return entry
    steps = steps[steps["layer"] == layer]
    chosen = [np.asarray(s, dtype=np.int64) for s in steps["selected"]]  # one array per step, best first
    if not chosen:
        return entry
    lengths = np.array([len(c) for c in chosen])
    flat = np.concatenate(chosen)
    place = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    step = np.repeat(steps["step"].to_numpy(np.int64), lengths)
    hit = flat == slot
    if not hit.any():
        return entry
    entry.update(best_rank=int(place[hit].min()) + 1, steps_selected=int(len(np.unique(step[hit]))), selected=True)
    if run.has_deltas and base_values is not None and base_hash == run.base_model_hash:
        delta = run.delta(int(step[hit].max())).get(layer)  # the step that wrote the row last
        if delta is not None and bool((delta[0] == slot).any()):
            after = delta[1][int(torch.nonzero(delta[0] == slot)[0, 0])].float().cpu()
            entry["delta_norm"] = float((after - base_values[slot].float().cpu()).norm())
    return entry


@torch.no_grad()
def slot_card(
    index: SlotIndex, slot: int, layer: int | None = None, *, model: MemoryModel | None = None,
    stats: SlotStats | None = None, runs: Iterable[Run] = (), entity_profile: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """A summary of one slot, as a plain dict (None where an input was not given or nothing applies):

    slot, layer; reads (every read: tokens × heads); reading_tokens (distinct tokens reading it);
    density (reading_tokens / the trace's tokens: the share whose top-k in any head holds it) and
    density_per_head ({head: share of tokens whose head's top-k holds it}); mean_weight, max_weight
    (over its reads; None when dead); i1, i2 (its sub-keys: slot = i1 · n_keys + i2);
    with `model` (the trace's memory config): value_norm ‖V[slot]‖ and median_value_norm (np.median
    over the layer's value rows); with `stats` (`SlotStats`): df (background document frequency),
    idf (`SlotStats.idf`), background_docs (|B|) and background_unit; runs: one dict per run of
    `runs` (`smviz.analysis.Run`) — run (path), method, selected (in any step), steps_selected,
    best_rank (its best place in a step's stored selection, 1 = best, as ranked by the run's
    selection rule: TF-IDF for sparse runs), delta_norm (‖V_end − V_base‖ of its row, from the
    run's last delta writing it; only when the run stores deltas and `model` is the run's base model);
    with `entity_profile` (`slot_entity_profile`'s DataFrame for this layer): entity_label (the
    share_<LABEL> with the most mass), entity_share (that share), entity_mass_share, entity_top (top1)
    and entity_q_value (q_value) — None if the slot has no row; label (`slot_label`); summary_only
    (the trace keeps per-slot summaries, not every read: density_per_head is then None)."""
    trace = index.trace
    slot = _check_slot(slot, trace.n_slots)
    layer = trace.resolve_layer(layer)
    memory = trace.meta["memory"]
    if isinstance(index, SummarySlotIndex):
        card = _summary_card(index, slot, layer)
    else:
        card = _reads_card(index, slot, layer)
    card.update(i1=slot // int(memory["n_keys"]), i2=slot % int(memory["n_keys"]), value_norm=None, median_value_norm=None,
                df=None, idf=None, background_docs=None, background_unit=None)
    base_values = None
    if model is not None:
        if model.memory_config.to_dict() != memory:
            raise AnalysisError("the model's memory config differs from the one the trace was recorded with")
        base_values = model.memory_layers[layer].value_table.weight.detach()
        norms = base_values.float().norm(dim=1).double().cpu().numpy()
        card.update(value_norm=float(norms[slot]), median_value_norm=float(np.median(norms)))
    if stats is not None:
        if stats.n_slots != trace.n_slots:
            raise AnalysisError(f"the background statistics have {stats.n_slots:,} slots, the trace {trace.n_slots:,}")
        card.update(df=int(stats.df[stats.layer_index(layer), slot]), idf=float(stats.idf(layer)[slot]),
                    background_docs=stats.n_docs, background_unit=stats.unit)
    base_hash = model.model_hash if model is not None else None
    card["runs"] = [_run_entry(run, slot, layer, base_values, base_hash) for run in runs]
    card.update(profile_entry(entity_profile, slot))
    card["label"] = slot_label(index, slot, layer)
    return card


def _reads_card(index: SlotIndex, slot: int, layer: int) -> dict[str, Any]:
    weights, heads = index.slot_weights(slot, layer), index.slot_heads(slot, layer)
    rows, _, _ = index.readers(slot, layer)
    n_tokens, n_heads = index.trace.n_tokens, int(index.trace.meta["memory"]["heads"])
    read_rows = index.slot_rows(slot, layer).astype(np.int64)
    per_head = np.bincount(np.unique(read_rows * n_heads + heads) % n_heads, minlength=n_heads)  # distinct (token, head)
    return {
        "slot": slot, "layer": layer, "reads": int(len(weights)), "reading_tokens": int(len(rows)),
        "density": len(rows) / n_tokens if n_tokens else 0.0,
        "density_per_head": {h: (float(per_head[h]) / n_tokens if n_tokens else 0.0) for h in range(n_heads)},
        "mean_weight": float(weights.astype(np.float64).mean()) if len(weights) else None,
        "max_weight": float(weights.max()) if len(weights) else None, "summary_only": False,
    }


def _summary_card(index: SummarySlotIndex, slot: int, layer: int) -> dict[str, Any]:
    """The card's read numbers from a summary-only trace's summary (per head: not kept, None)."""
    s, n_tokens = index.slot_summary(slot, layer), index.trace.n_tokens
    return {
        "slot": slot, "layer": layer, "reads": int(s["reads"]), "reading_tokens": int(s["tokens"]),
        "density": s["tokens"] / n_tokens if n_tokens else 0.0, "density_per_head": None,
        "mean_weight": s["weight_mean"] if s["reads"] else None, "max_weight": s["weight_max"] if s["reads"] else None,
        "summary_only": True,
    }
