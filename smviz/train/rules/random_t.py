"""A control (method `random-t`): t read slots uniformly at random, seeded by (seed, step) so a
resumed run draws the same; the score reported is the read share."""

from __future__ import annotations

import torch

from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(reads.seed * 1_000_003 + reads.step)
    order = torch.randperm(len(reads.slots), generator=g)[: reads.top_t].to(reads.slots.device)
    return reads.tf, order


RULE = SelectionRule("random-t", choose, "t read slots uniformly at random (a control)")
