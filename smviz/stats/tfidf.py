"""The paper's ranking of a batch's slots against background statistics: `tfidf`, `top_slots`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

from smviz.stats.slot_stats import SlotStats, SlotStatsError

# --------------------------------------------------------------------------- TF-IDF


def idf(df: torch.Tensor, n_docs: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's inverse document frequency log((|B| + 1) / (df(i) + 1)), |B| = n_docs."""
    return torch.log((n_docs + 1) / (df.to(dtype) + 1))


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
    int64, float64 scores), by score descending, ties broken by lower slot id; all read slots when fewer
    than t were read."""
    if t < 0:
        raise SlotStatsError(f"t must be >= 0, got {t}")
    if counts.shape != (stats.n_slots,):
        raise SlotStatsError(f"counts must have shape ({stats.n_slots},), got {tuple(counts.shape)}")
    scores = tfidf(counts, stats.df[stats.layer_index(layer)], stats.n_docs)
    read = torch.nonzero(counts > 0).flatten()  # ascending ids
    order = torch.sort(scores[read], descending=True, stable=True).indices[:t]  # stable: equal scores keep id order
    return read[order], scores[read[order]]

