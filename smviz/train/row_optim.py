"""Sparse memory finetuning's row optimizers: updating only the value rows a step selected
(`RowSGD`, `RowAdamW`), every other row left bit-identical, with state only for rows ever chosen."""

from __future__ import annotations

import torch


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
        self.used = 0  # state rows in use; the buffers below grow by doubling
        self._slots = torch.zeros(0, dtype=torch.long, device=device)  # state row j belongs to slot _slots[j]
        self._exp_avg = torch.zeros(0, v_dim, device=device)
        self._exp_avg_sq = torch.zeros(0, v_dim, device=device)
        self._steps = torch.zeros(0, dtype=torch.long, device=device)

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._slots):
            return
        size = max(rows, 2 * len(self._slots), 1024)
        device, v_dim = self._slots.device, self._exp_avg.shape[1]

        def grown(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            out = torch.zeros(shape, dtype=t.dtype, device=device)
            out[: self.used] = t[: self.used]
            return out

        self._slots = grown(self._slots, (size,))
        self._exp_avg = grown(self._exp_avg, (size, v_dim))
        self._exp_avg_sq = grown(self._exp_avg_sq, (size, v_dim))
        self._steps = grown(self._steps, (size,))

    @torch.no_grad()
    def step(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        fresh = rows[self.slot_state[rows] < 0]
        if len(fresh):
            self._reserve(self.used + len(fresh))
            new = torch.arange(self.used, self.used + len(fresh), device=rows.device)
            self.slot_state[fresh] = new
            self._slots[new] = fresh
            self.used += len(fresh)
        j = self.slot_state[rows]
        b1, b2 = self.betas
        g = grad.to(self._exp_avg.dtype)
        m = self._exp_avg[j].mul_(b1).add_(g, alpha=1 - b1)
        v = self._exp_avg_sq[j].mul_(b2).addcmul_(g, g, value=1 - b2)
        s = self._steps[j] + 1
        self._exp_avg[j], self._exp_avg_sq[j], self._steps[j] = m, v, s
        bias1 = 1 - b1 ** s.double()
        bias2 = 1 - b2 ** s.double()
        update = (m / bias1[:, None].to(m.dtype)) / ((v / bias2[:, None].to(v.dtype)).sqrt() + self.eps)
        w = weight[rows].float()
        w = w * (1 - self.lr * self.weight_decay) - self.lr * update
        weight[rows] = w.to(weight.dtype)

    def state_elements(self) -> int:
        """Numbers held: the slot map (N) and, per row ever chosen, its moments (2 · v_dim) and step."""
        return self.slot_state.numel() + self.used * (2 * self._exp_avg.shape[1] + 2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        n = self.used
        return {"slots": self._slots[:n].cpu(), "exp_avg": self._exp_avg[:n].cpu(), "exp_avg_sq": self._exp_avg_sq[:n].cpu(),
                "steps": self._steps[:n].cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.slot_state.device
        self.used = 0
        self._slots = state["slots"].to(device)
        self._exp_avg = state["exp_avg"].to(device)
        self._exp_avg_sq = state["exp_avg_sq"].to(device)
        self._steps = state["steps"].to(device)
        self.used = len(self._slots)
        self.slot_state.fill_(-1)
        self.slot_state[self._slots] = torch.arange(self.used, device=device)
