"""`weighted_bag`: the value read Σ_j w[b, j] · V[idx[b, j]] with a backward grouped by value row
(see smviz/kernels/__init__.py for the method and what it is measured against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _WeightedBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices, table, weights)
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        indices, table, weights = ctx.saved_tensors
        m, j = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat)
        rows = flat[order]
        # bag r of the transposed read = the reads of value row r: offsets of every row, empty ones included,
        # so the pass writes dV whole (a row nobody read gets zeros)
        offsets = torch.searchsorted(rows, torch.arange(table.shape[0], device=rows.device))
        readers = order // j
        with torch.enable_grad():
            w_sorted = weights.reshape(-1)[order].detach().requires_grad_(True)
            grad_table = F.embedding_bag(readers, grad_out, offsets, per_sample_weights=w_sorted, mode="sum")
            grad_w_sorted = None
            if ctx.needs_input_grad[2]:
                (grad_w_sorted,) = torch.autograd.grad(grad_table, w_sorted, table.detach())
        grad_w = None
        if grad_w_sorted is not None:
            grad_w = torch.empty_like(grad_w_sorted).index_copy_(0, order, grad_w_sorted).view(m, j)
        return None, grad_table if ctx.needs_input_grad[1] else None, grad_w


def weighted_bag(indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum"): (M, J) ids and weights →
    (M, d), with gradients to `table` and `weights` from one pass over the reads sorted by row. A table
    without gradient (sparse finetuning's frozen rows) takes PyTorch's path: the transposed bag would
    build an (N, d) gradient only to reach the weights'."""
    if not table.requires_grad or not torch.is_grad_enabled():
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
    return _WeightedBag.apply(indices, table, weights)
