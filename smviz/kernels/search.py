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


class _PairScores(torch.autograd.Function):
    """The chosen sums s1[a] + s2[b] (flat = a·K + b), with the reference's own backward: their gradient
    scattered into the K×K grid and summed over each half's axis, the very reductions autograd runs for
    the reference's broadcast sum, so that training on the fast path is bit-identical to the reference."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        knn = s.shape[-1]
        ctx.save_for_backward(flat)
        ctx.knn = knn
        return s[:, :, 0].gather(-1, flat // knn) + s[:, :, 1].gather(-1, flat % knn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        knn = ctx.knn
        grid = grad.new_zeros(*grad.shape[:-1], knn * knn).scatter_(-1, flat, grad).view(*grad.shape[:-1], knn, knn)
        return torch.stack((grid.sum(-1), grid.sum(-2)), dim=2), None


def best_pairs(s: torch.Tensor, i: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of each head from its halves' top-k sub-keys.

    s, i: (M, H, 2, K) scores (sorted, best first — as torch.topk returns them) and sub-key ids of each
    half. Returns slot ids i1 · n_keys + i2 (M, H, K) int64 and their scores s1 + s2 (M, H, K), best first.
    The search over the reachable pairs runs without autograd; the gradient of the scores is the
    reference's, bit for bit (`_PairScores`)."""
    knn = s.shape[-1]
    rank1, rank2 = reachable_pairs(knn, s.device)
    with torch.no_grad():
        sums = s[:, :, 0].index_select(-1, rank1) + s[:, :, 1].index_select(-1, rank2)  # (M, H, P)
        pick = sums.topk(knn, dim=-1).indices
    a, b = rank1[pick], rank2[pick]
    scores = _PairScores.apply(s, a * knn + b)
    return i[:, :, 0].gather(-1, a) * n_keys + i[:, :, 1].gather(-1, b), scores
