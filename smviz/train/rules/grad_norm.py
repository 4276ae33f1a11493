"""Method `grad-norm`: the top-t read slots by the L2 norm of their value row's gradient on the batch —
the baseline a reviewer asks of any selection rule (train the rows the loss wants changed most). Every
read row's gradient is computed (a (reads, v_dim) tensor, never (N, v_dim)); the trainer then keeps the
`top_t` largest (`SelectionRule.ranks_gradient`, ties to the lower slot id) and updates only those."""

from __future__ import annotations

import torch

from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    # every read row, ascending: the gradient decides (the trainer ranks them after the backward pass)
    return reads.tf, torch.arange(len(reads.slots), device=reads.slots.device)


RULE = SelectionRule("grad-norm", choose, "top-t read slots by the norm of their value gradient on the batch",
                     ranks_gradient=True)
