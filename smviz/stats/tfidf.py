"""THE ranking of smviz and the paper's score: `rank` (score descending, ties to the lower position,
hence the lower slot id) — what training's selection rules, the analysis tables and `top_slots` all
order by — and `tfidf` / `top_slots`, a batch's slots scored against background statistics."""

from __future__ import annotations

import torch

from smviz.errors import StatsError
from smviz.stats.slot_stats import SlotStats, idf


def rank(scores: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """Positions (int64) of the `t` highest `scores` (every one when t is None or >= len), best first,
    equal scores in position order: with candidates listed by ascending slot id, ties go to the lower
    slot id. Only candidates at or above the t-th score are sorted, not all of them."""
    n = len(scores)
    if t is not None and t < 0:
        raise StatsError(f"t must be >= 0, got {t}")
    if t == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if t is not None and t < n:
        threshold = torch.topk(scores, t, sorted=False).values.min()
        candidates = torch.nonzero(scores >= threshold).flatten()
    else:
        candidates = torch.arange(n, device=scores.device)
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:t]
    return candidates[order]


def tfidf(counts: torch.Tensor, df: torch.Tensor, n_docs: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's score per slot: TF-IDF(i) = c(i) / Σ_j c(j) · log((|B| + 1) / (df(i) + 1)), with c the
    current batch's counts, df the background document frequency and |B| = n_docs. On counts' device;
    all zeros when the batch read nothing."""
    c = counts.to(dtype)
    total = c.sum()
    tf = torch.where(total > 0, c / total, torch.zeros_like(c))  # no host synchronisation
    return tf * idf(df.to(c.device), n_docs, dtype=dtype)


def top_slots(counts: torch.Tensor, stats: SlotStats, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`t` slots of block `layer` by TF-IDF among those the batch read (counts > 0): (slot ids
    int64, float64 scores), ranked by `rank`; all read slots when fewer than t were read."""
    if t < 0:
        raise StatsError(f"t must be >= 0, got {t}")
    if counts.shape != (stats.n_slots,):
        raise StatsError(f"counts must have shape ({stats.n_slots},), got {tuple(counts.shape)}")
    scores = tfidf(counts, stats.df[stats.layer_index(layer)], stats.n_docs)
    read = torch.nonzero(counts > 0).flatten()  # ascending ids
    chosen = read[rank(scores[read], t)]
    return chosen, scores[chosen]
