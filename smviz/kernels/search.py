"""`best_pairs`: the product-key search's last step over the pairs of ranks that can reach the top-k
(see smviz/kernels/__init__.py for why that is exact)."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def reachable_pairs(knn: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (a, b), 0-based, with (a+1)·(b+1) ≤ knn, in row-major order of the knn × knn grid."""
    a = torch.arange(knn, device=device)
    rank1, rank2 = torch.meshgrid(a, a, indexing="ij")
    keep = (rank1 + 1) * (rank2 + 1) <= knn
    return rank1[keep], rank2[keep]


def best_pairs(s: torch.Tensor, i: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of each head from its halves' top-k sub-keys.

    s, i: (M, H, 2, K) scores (sorted, best first — as torch.topk returns them) and sub-key ids of each
    half. Returns slot ids i1 · n_keys + i2 (M, H, K) int64 and their scores s1 + s2 (M, H, K), best first."""
    knn = s.shape[-1]
    rank1, rank2 = reachable_pairs(knn, s.device)
    sums = s[:, :, 0].index_select(-1, rank1) + s[:, :, 1].index_select(-1, rank2)  # (M, H, P)
    scores, pick = sums.topk(knn, dim=-1)
    i1 = i[:, :, 0].gather(-1, rank1[pick])
    i2 = i[:, :, 1].gather(-1, rank2[pick])
    return i1 * n_keys + i2, scores
