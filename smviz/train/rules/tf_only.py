"""The paper's "no reranking" ablation (method `tf-only`): the top-t read slots by read count."""

from __future__ import annotations

import torch

from smviz.stats import rank
from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    return reads.tf, rank(reads.tf, reads.top_t)


RULE = SelectionRule("tf-only", choose, "top-t read slots by read count (no reranking against a background)")
