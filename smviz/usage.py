"""Memory health: how many of a memory's slots are actually read.

Product-key memories trained from scratch tend to collapse onto a few slots; these instruments make
that visible while training. `usage_metrics(counts)` turns per-slot read counts into the standard
numbers (Lample et al. 2019 introduced share-used and KL from uniform); `UsageMonitor` counts reads
of a `MemoryModel`'s layers over a window of batches with one `bincount` per layer and batch, on the
model's device, skipping padding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from smviz.memory import ProductKeyMemory
    from smviz.model import MemoryModel

MASS_LEVELS = (0.5, 0.9, 0.99)


def usage_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Usage numbers of one memory from its per-slot access counts (length N, any non-negative dtype).

    - `used_share`: share of slots read at least once;
    - `entropy`: entropy (nats) of the access distribution p = counts / Σ counts;
    - `kl_uniform`: KL(p ‖ uniform) = ln N − entropy (0 when every slot is read equally);
    - `gini`: Gini coefficient of the counts (0 = equal use, → 1 = all reads on one slot);
    - `slots_50`, `slots_90`, `slots_99`: fewest slots that together hold 50/90/99 % of the reads;
    - `dead`: number of slots never read (count 0);
    - `slots`: N; `accesses`: total reads counted.
    With no reads at all, every metric but `slots`, `accesses` and `dead` (= N) is NaN.
    """
    c = counts.detach().double().flatten()
    n = c.numel()
    total = c.sum().item()
    out: dict[str, float] = {"slots": n, "accesses": total, "dead": int((c == 0).sum().item())}
    if total <= 0:
        nan = float("nan")
        return out | {"used_share": nan, "entropy": nan, "kl_uniform": nan, "gini": nan} | {
            f"slots_{round(q * 100)}": nan for q in MASS_LEVELS
        }
    p = c / total
    nz = p[p > 0]
    entropy = -(nz * nz.log()).sum().item()
    ascending = c.sort().values
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    gini = (2 * (ranks * ascending).sum() / (n * total) - (n + 1) / n).item()
    cumulative = p.sort(descending=True).values.cumsum(0)
    out |= {
        "used_share": (c > 0).double().mean().item(),
        "entropy": entropy,
        "kl_uniform": math.log(n) - entropy,
        "gini": gini,
    }
    for q in MASS_LEVELS:
        # fewest slots whose mass reaches q (small tolerance for float rounding of the cumulative sum)
        k = int(torch.searchsorted(cumulative, torch.tensor([q - 1e-12], dtype=torch.float64, device=c.device)).item()) + 1
        out[f"slots_{round(q * 100)}"] = min(k, n)
    return out


class UsageMonitor:
    """Counts the slot reads of a model's memory layers while attached (a context manager).

        with UsageMonitor(model) as usage:
            for batch in batches:
                model(**batch)
        usage.metrics()   # {block index: usage_metrics(...)}
        usage.reset()     # start the next window

    Every read counts once (each token × head × top-k rank); `weighted=True` counts softmax weight
    instead. Padding positions (attention mask 0) are skipped. Counts live on the model's device.
    """

    def __init__(self, model: MemoryModel, *, weighted: bool = False) -> None:
        self.model = model
        self.weighted = weighted
        self.counts: dict[int, torch.Tensor] = {}
        self.batches = 0
        self._handles: list = []

    def __enter__(self) -> UsageMonitor:
        for i, layer in self.model.memory_layers.items():
            self.counts[i] = torch.zeros(layer.config.n_slots, dtype=torch.float64, device=layer.keys.device)
            self._handles.append(layer.add_access_hook(self._hook(i)))
        self._handles.append(self.model.lm.register_forward_pre_hook(self._count_batch))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, block: int):
        def count(layer: ProductKeyMemory, indices: torch.Tensor, weights: torch.Tensor, mask) -> None:
            if mask is not None:
                indices, weights = indices[mask], weights[mask]
            w = weights.detach().flatten().double() if self.weighted else None
            self.counts[block] += torch.bincount(indices.flatten(), weights=w, minlength=layer.config.n_slots)

        return count

    def _count_batch(self, *_: object) -> None:
        self.batches += 1

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()
        self.batches = 0

    def metrics(self) -> dict[int, dict[str, float]]:
        """Block index → `usage_metrics` of the reads counted since the last reset."""
        return {i: usage_metrics(c) | {"batches": self.batches} for i, c in self.counts.items()}
