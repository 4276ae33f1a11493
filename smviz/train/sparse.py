"""Sparse memory finetuning's two parts: choosing which value rows a batch trains (`RowSelector`: the
paper's TF-IDF top-t and its ablations) and updating only those rows (`RowSGD`, `RowAdamW`).

Selection runs inside the forward pass, from an access hook: the hook sees the batch's reads after
the product-key lookup and before the values are read, counts them (padding excluded, every head,
every one of the top-k: `smviz.stats.batch_counts`), ranks the slots on the device, and hands the
chosen rows to `ValueTable.choose_rows`. One forward pass therefore both selects and computes the
(t, v_dim) gradient; no N×v_dim mask, gradient or optimizer state exists.

Rules (method → rows of each batch, among the slots it read):
- `sparse`: top-t by TF-IDF(i) = c(i)/Σc · log((|B|+1)/(df(i)+1)) against background `SlotStats`;
- `tf-only`: top-t by c(i) (the paper's "no reranking" ablation);
- `memory-all`: every read slot;
- `random-t`: t read slots uniformly at random (a control; seeded by the step).
Ties go to the lower slot id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smviz.errors import ConfigError
from smviz.stats import SlotStats, tfidf

SELECTIONS = ("sparse", "tf-only", "memory-all", "random-t")


@dataclass
class Selection:
    """What one layer selected in one step (tensors on the model's device)."""

    rows: torch.Tensor  # (t,) int64 slot ids, best first
    tf: torch.Tensor  # (t,) float: c(i) / Σc
    df: torch.Tensor  # (t,) int64 background document frequency (-1 without background statistics)
    score: torch.Tensor  # (t,) float: the ranking score (TF-IDF, TF, or TF for memory-all / random-t)
    accessed: int  # distinct slots the batch read


class RowSelector:
    """Ranks a batch's read slots per memory layer by the rule of `method` (see module docstring)."""

    def __init__(self, method: str, top_t: int, n_slots: int, stats: SlotStats | None, device: torch.device, seed: int = 0) -> None:
        if method not in SELECTIONS:
            raise ConfigError(f"unknown selection method {method!r}; choose one of {list(SELECTIONS)}")
        if method != "memory-all" and not 1 <= top_t <= n_slots:
            raise ConfigError(f"top_t must lie in [1, {n_slots}] (the memory's slots), got {top_t}")
        if method == "sparse" and stats is None:
            raise ConfigError("TF-IDF selection needs the model's background slot statistics")
        self.method, self.top_t, self.n_slots, self.seed = method, top_t, n_slots, seed
        self.stats = stats
        # background document frequency per layer, moved to the device once
        self._df = {} if stats is None else {layer: stats.df[stats.layer_index(layer)].to(device) for layer in stats.layers}

    def select(self, layer: int, counts: torch.Tensor, step: int) -> Selection:
        """The rows layer `layer` trains, from the batch's per-slot counts (length N, on the device)."""
        read = torch.nonzero(counts).flatten()  # ascending ids
        c = counts[read]
        tf = c.double() / c.sum().clamp(min=1)
        df = self._df[layer][read] if layer in self._df else torch.full_like(read, -1)
        if self.method == "sparse":
            score = tfidf(counts, self._df[layer], self.stats.n_docs)[read]
        else:
            score = tf
        if self.method == "memory-all":
            order = torch.sort(score, descending=True, stable=True).indices
        elif self.method == "random-t":
            g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
            order = torch.randperm(len(read), generator=g)[: self.top_t].to(read.device)
        else:  # stable sort over ascending ids: equal scores keep the lower id first
            order = torch.sort(score, descending=True, stable=True).indices[: self.top_t]
        return Selection(read[order], tf[order], df[order], score[order], accessed=len(read))


class RowSGD:
    """Plain SGD (no momentum, no weight decay) on chosen rows: w[rows] -= lr · grad. Every other
    row is not touched at all, so it stays bit-identical."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    @torch.no_grad()
    def step(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        weight.index_add_(0, rows, grad.to(weight.dtype), alpha=-self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class RowAdamW:
    """AdamW on chosen rows with state only for rows ever chosen ("lazy" AdamW, as torch's SparseAdam):
    a row's moments, its step count (for bias correction) and its decoupled weight decay advance only
    in the steps that select it. A dense AdamW would keep moving rows after their last selection
    (momentum) and shrink every row (weight decay) — the paper's warning that AdamW "interacts with
    sparsity in unexpected ways"; here unselected rows stay bit-identical.

    State: a slot → state-row map (N ints) and (rows ever chosen, v_dim) moment tensors."""

    def __init__(self, n_slots: int, v_dim: int, lr: float, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, device: torch.device | str = "cpu") -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.slot_state = torch.full((n_slots,), -1, dtype=torch.long, device=device)
        self.slots = torch.zeros(0, dtype=torch.long, device=device)  # state row j belongs to slot slots[j]
        self.exp_avg = torch.zeros(0, v_dim, device=device)
        self.exp_avg_sq = torch.zeros(0, v_dim, device=device)
        self.steps = torch.zeros(0, dtype=torch.long, device=device)

    @torch.no_grad()
    def step(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        fresh = rows[self.slot_state[rows] < 0]
        if len(fresh):
            self.slot_state[fresh] = torch.arange(len(self.slots), len(self.slots) + len(fresh), device=rows.device)
            self.slots = torch.cat([self.slots, fresh])
            zeros = torch.zeros(len(fresh), self.exp_avg.shape[1], device=rows.device, dtype=self.exp_avg.dtype)
            self.exp_avg = torch.cat([self.exp_avg, zeros])
            self.exp_avg_sq = torch.cat([self.exp_avg_sq, zeros])
            self.steps = torch.cat([self.steps, torch.zeros(len(fresh), dtype=torch.long, device=rows.device)])
        j = self.slot_state[rows]
        b1, b2 = self.betas
        g = grad.to(self.exp_avg.dtype)
        m = self.exp_avg[j].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[j].mul_(b2).addcmul_(g, g, value=1 - b2)
        s = self.steps[j] + 1
        self.exp_avg[j], self.exp_avg_sq[j], self.steps[j] = m, v, s
        bias1 = 1 - b1 ** s.double()
        bias2 = 1 - b2 ** s.double()
        update = (m / bias1[:, None].to(m.dtype)) / ((v / bias2[:, None].to(v.dtype)).sqrt() + self.eps)
        w = weight[rows].float()
        w = w * (1 - self.lr * self.weight_decay) - self.lr * update
        weight[rows] = w.to(weight.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"slots": self.slots.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(), "steps": self.steps.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.slot_state.device
        self.slots = state["slots"].to(device)
        self.exp_avg = state["exp_avg"].to(device)
        self.exp_avg_sq = state["exp_avg_sq"].to(device)
        self.steps = state["steps"].to(device)
        self.slot_state.fill_(-1)
        self.slot_state[self.slots] = torch.arange(len(self.slots), device=device)
