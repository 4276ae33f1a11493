"""Method `kl`: the top-t read slots by their term of KL(p ‖ q), score(i) = p(i) · log(p(i) / q(i)) — the
KL rule of arXiv 2604.05248 and of the public re-implementation of arXiv 2605.03229.

p(i) = c(i) / Σc is the batch's read share of slot i in the layer; q(i) = (b(i) + 1) / (Σb + N) is the
background's read share with add-one smoothing (b: background read counts, N: the memory's slots), so
q > 0 everywhere. Only read slots (p > 0) are scored and selected; a slot the batch reads much more
often than the background does scores high, one it reads less often scores below zero."""

from __future__ import annotations

import torch

from smviz.stats import rank
from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    background = reads.background
    q = (background.counts[reads.slots].double() + 1) / (background.total + reads.n_slots)
    p = reads.tf
    score = p * torch.log(p / q)
    return score, rank(score, reads.top_t)


RULE = SelectionRule("kl", choose, "top-t read slots by p·log(p/q): batch read share against the background's",
                     needs_stats=True)
