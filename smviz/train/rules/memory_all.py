"""Method `memory-all`: every slot the batch read, ranked by read count (top_t is not used)."""

from __future__ import annotations

import torch

from smviz.stats import rank
from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    return reads.tf, rank(reads.tf)


RULE = SelectionRule("memory-all", choose, "every read slot (all value rows the batch read)", uses_top_t=False)
