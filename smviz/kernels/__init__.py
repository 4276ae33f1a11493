"""Fast paths of the memory layer's two hot spots, chosen automatically; `smviz/memory.py` keeps the plain
PyTorch path they are tested against (tests/test_kernels.py) and benchmarked beside
(benchmarks/bench_memory.py).

- `best_pairs`: the final top-k of the k×k sums of the two halves' sorted top-k sub-key scores, formed
  only over the pairs of ranks (a, b) with (a+1)·(b+1) ≤ k (119 of 1,024 at k = 32). A pair outside
  them has (a+1)·(b+1) > k pairs at least as good (every a' ≤ a with every b' ≤ b), so it cannot be in
  the top-k: the same scores, bit for bit, and the same slots except among equal scores at the k-th
  place, where any choice is a top-k (torch.topk itself promises no order among ties). Every device.
- `weighted_bag`: Σ_j w[b, j] · V[idx[b, j]] with a sort-by-row backward. The value gradient is itself a
  weighted bag, over the output gradient g (M, d) with the reads grouped by row — one embedding_bag pass
  that writes every row of dV, no (N, d) zero-fill and scatter; the weight gradient, ⟨g[b], V[idx]⟩, is
  the per-sample-weight gradient of that same transposed bag, computed reading V row after row in order
  while g (small) stays in cache. The value gradient is bit-identical to PyTorch's own backward on CPU
  (the same products summed in the same order per row); the weight gradient equals it to float rounding
  (its dot products are summed in another order). Measured in benchmarks/bench_memory.py. On CUDA
  PyTorch's embedding_bag backward already sorts by row, so the plain path is kept there until the
  transposed form is measured on a GPU.

`reference()` switches every fast path off in a block (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from smviz.kernels.bag import weighted_bag
from smviz.kernels.search import best_pairs

__all__ = ["best_pairs", "fast_bag", "fast_search", "reference", "weighted_bag"]

_enabled = True
BAG_DEVICES = ("cpu",)  # where weighted_bag replaces F.embedding_bag (measured faster there)


def fast_search() -> bool:
    """Whether the memory layer's search uses `best_pairs` (on every device, unless inside `reference`)."""
    return _enabled


def fast_bag(device: torch.device) -> bool:
    """Whether the memory layer's value bag uses `weighted_bag` on this device."""
    return _enabled and device.type in BAG_DEVICES


@contextmanager
def reference() -> Iterator[None]:
    """Inside the block the memory layer takes its plain PyTorch path everywhere."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
