"""Fast paths of the memory layer's two hot spots, chosen automatically; `smviz/memory.py` keeps the plain
PyTorch path they are tested against (tests/test_kernels.py) and benchmarked beside
(benchmarks/bench_memory.py).

- `best_pairs`: the final top-k of the k×k sums of the two halves' sorted top-k sub-key scores, formed
  only over the pairs of ranks (a, b) with (a+1)·(b+1) ≤ k (119 of 1,024 at k = 32). A pair outside
  them has (a+1)·(b+1) > k pairs at least as good (every a' ≤ a with every b' ≤ b), so it cannot be in
  the top-k: the same scores, bit for bit, and the same slots except among equal scores at the k-th
  place, where any choice is a top-k (torch.topk itself promises no order among ties). Its backward is
  the reference's (the K×K grid summed per half), so gradients are bit-identical too. What remains is
  the order among tied scores, which torch.topk leaves to its implementation: on the demo's first
  pretraining batch 1 of 8,192 head-rows reads another of two tied slots. Training on the fast path
  therefore drifts from the reference's bit by bit, as training on another CPU does; to rebuild a
  model made on the reference path bit for bit (e.g. the committed study's 291c1680d875a736), set
  SMVIZ_KERNELS=reference. Every device.
- `weighted_bag`: Σ_j w[b, j] · V[idx[b, j]] with a sort-by-row backward. The value gradient is itself a
  weighted bag, over the output gradient g (M, d) with the reads grouped by row — one embedding_bag pass
  that writes every row of dV, no (N, d) zero-fill and scatter; the weight gradient, ⟨g[b], V[idx]⟩, is
  the per-sample-weight gradient of that same transposed bag, computed reading V row after row in order
  while g (small) stays in cache. Both gradients are bit-identical to PyTorch's own backward on CPU (the
  same products summed in the same order). On 2 CPU cores at the tiny shape
  (benchmarks/bench_memory.py) the bag's forward+backward is 1.61× faster, the search 1.23× (forward and
  forward+backward), the layer 1.19× forward and 1.35× forward+backward. On CUDA PyTorch's embedding_bag backward already sorts by
  row, so the plain path is kept there until the transposed form is measured on a GPU.

`reference()` switches every fast path off in a block (tests, benchmarks); the environment variable
SMVIZ_KERNELS=reference switches it off for the whole process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from smviz.kernels.bag import weighted_bag
from smviz.kernels.search import best_pairs

__all__ = ["best_pairs", "fast_bag", "fast_search", "reference", "weighted_bag"]

ENV = "SMVIZ_KERNELS"
if os.environ.get(ENV, "fast") not in ("fast", "reference"):
    raise ValueError(f"{ENV} must be 'fast' or 'reference', got {os.environ[ENV]!r}")
_enabled = os.environ.get(ENV, "fast") == "fast"
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
