"""Entity statistics of memory slots (see `smviz.analysis.entities` for the flow, the alignment rule
and what a read and a slot's mass are): per-slot entity profiles with Fisher-exact enrichment and
Benjamini–Hochberg q-values, and the entity share of the slots a finetuning run selected against a
matched random draw of the slots its facts read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from scipy import stats

from smviz.data.facts import parse_fact_doc_id
from smviz.errors import AnalysisError, ConfigError

if TYPE_CHECKING:

    from smviz.analysis.runs import Run
    from smviz.trace import Trace


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
        raise ConfigError(f"min_reads and top must be >= 0, got {min_reads} and {top}")
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
    there falls on entity tokens. The pool of a fact is its documents in the trace (doc ids
    ``'<fact_id>:sI'`` / ``'<fact_id>:qJ'``, `smviz.data.facts.fact_doc_id`, as a trace of the facts file
    has them; a step uses its fact's pool); where the
    trace holds none of the fact's documents the pool is the whole trace (column pool = 'trace').

    One row per fact (`by="fact"`, selections unioned over its steps) or per step (`by="step"`):
    key (fact id or step), fact_id, pool ('fact'|'trace'), n_selected, n_read (selected slots the pool
    reads), n_aligned, share (n_aligned / n_read), n_pool (slots the pool reads), pool_aligned,
    baseline_mean, baseline_std (share over `draws` uniform draws of n_read slots without replacement
    from the pool's read slots, seeded), difference (share - baseline_mean), p_value (exact
    hypergeometric probability that a draw reaches share). The run must start from the model the trace
    was recorded with."""
    if by not in ("fact", "step"):
        raise ConfigError(f"by must be 'fact' or 'step', got {by!r}")
    if not 0.0 < threshold <= 1.0 or draws < 1:
        raise ConfigError(f"threshold must lie in (0, 1] and draws be >= 1, got {threshold} and {draws}")
    if trace.model_hash is None or trace.model_hash != run.base_model_hash:
        raise AnalysisError(f"the trace was recorded with model {trace.model_hash}, but the run started from model "
                          f"{run.base_model_hash}; record a trace with the run's base model")
    layer = trace.resolve_layer(layer)
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
        raise ConfigError("the selection is empty: no slots to analyse")
    n = trace.n_slots
    sel = {k: np.unique(_check_slots(np.asarray(v), n)) for k, v in selection.items()}
    empty = [k for k, v in sel.items() if len(v) == 0]
    if empty:
        raise ConfigError(f"the selection of {empty[:5]} is empty; drop those keys")
    tok_entity, *_ = _token_arrays(trace, tokens)
    slot, weight, token = _layer_accesses(trace, layer)
    ent = tok_entity[token] >= 0

    # pool of each fact: its documents '<fact_id>:*'; group 0 = the whole trace
    facts = sorted({str(fact_of[k]) for k in sel})
    fact_index = {f: i + 1 for i, f in enumerate(facts)}
    encoded = trace.tokens.column("doc_id").combine_chunks().dictionary_encode() if trace.n_tokens else None
    if encoded is not None:
        owners = [_fact_of(s) for s in encoded.dictionary.to_pylist()]  # per document
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


def _fact_of(doc_id: str) -> str | None:
    parsed = parse_fact_doc_id(doc_id)
    return parsed.fact_id if parsed else None


def _check_slots(slots: np.ndarray, n: int) -> np.ndarray:
    if slots.size and not np.issubdtype(slots.dtype, np.integer):
        raise ConfigError(f"slot ids must be integers, got {slots.dtype}")
    slots = slots.astype(np.int64).reshape(-1)
    bad = slots[(slots < 0) | (slots >= n)]
    if len(bad):
        raise ConfigError(f"slot {int(bad[0])} is out of range: the memory has {n:,} slots (0..{n - 1})")
    return slots


def _layer_accesses(trace: Trace, layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot, weight float64, token row) of every read of one memory layer."""
    layer = trace.resolve_layer(layer)
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
        raise ConfigError(f"tokens must be align_tokens(trace, spans) of this trace ({trace.n_tokens} rows with "
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


def profile_entry(profile: pd.DataFrame | None, slot: int) -> dict[str, Any]:
    """One slot's row of a `slot_entity_profile` as a slot card's entity fields (entity_label, entity_share,
    entity_mass_share, entity_top, entity_q_value; None where the profile or the slot's row is missing)."""
    entry: dict[str, Any] = dict.fromkeys(("entity_label", "entity_share", "entity_mass_share", "entity_top", "entity_q_value"))
    if profile is None:
        return entry
    if "slot" not in profile.columns:
        raise AnalysisError(f"entity_profile must be slot_entity_profile's DataFrame (with a slot column), got columns {list(profile.columns)}")
    hit = profile[profile["slot"] == slot]
    if hit.empty:
        return entry
    row = hit.iloc[0]
    shares = pd.to_numeric(row[[c for c in profile.columns if c.startswith("share_")]], errors="coerce").astype(float)
    if shares.notna().any() and shares.max() > 0:
        best = str(shares.idxmax())
        entry.update(entity_label=best[len("share_"):], entity_share=float(shares[best]))
    for key, column in (("entity_mass_share", "entity_mass_share"), ("entity_q_value", "q_value")):
        if column in row.index and pd.notna(row[column]):
            entry[key] = float(row[column])
    if "top1" in row.index and row["top1"]:
        entry["entity_top"] = str(row["top1"])
    return entry
