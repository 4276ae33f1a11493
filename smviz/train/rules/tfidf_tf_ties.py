"""Method `sparse-tf-ties`: the paper's TF-IDF ranking with ties broken by TF (then by slot id). A slot
read in every background batch has IDF log((|B|+1)/(|B|+1)) = 0, so its TF-IDF is 0 whatever the batch
read of it; when the top-t reaches such slots, `sparse` fills the remaining places by slot id (the
order `smviz.stats.rank` gives equal scores), this rule by how much the batch read them."""

from __future__ import annotations

import torch

from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    score = reads.tf * reads.background.idf[reads.slots]
    by_tf = torch.sort(reads.tf, descending=True, stable=True).indices  # equal TF: ascending slot id
    order = by_tf[torch.sort(score[by_tf], descending=True, stable=True).indices]
    return score, order[: reads.top_t]


RULE = SelectionRule("tf-idf-tf-ties", choose, "sparse, TF-IDF ties (slots read in every background batch) broken by TF",
                     method="sparse-tf-ties", needs_stats=True)
