"""The paper's rule (method `sparse`): the top-t read slots by TF-IDF(i) = c(i)/Σc · log((|B|+1)/(df(i)+1))
against the model's background statistics, as `smviz.stats.tfidf`."""

from __future__ import annotations

import torch

from smviz.stats import rank
from smviz.train.selection import Reads, SelectionRule


def choose(reads: Reads) -> tuple[torch.Tensor, torch.Tensor]:
    score = reads.tf * reads.background.idf[reads.slots]
    return score, rank(score, reads.top_t)


RULE = SelectionRule("tf-idf", choose, "sparse memory finetuning: top-t read slots by TF-IDF against the background",
                     method="sparse", needs_stats=True)
