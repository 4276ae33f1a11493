"""The one ranking of smviz (`smviz.stats.rank`: score descending, ties to the lower position) against a
brute-force sort, and the one IDF formula (`smviz.stats.idf`, which `SlotStats.idf` calls) against
math.log — what training's selection rules, the analysis tables and `top_slots` all rank by."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smviz.errors import StatsError
from smviz.stats import SlotStats, idf, rank


def brute_rank(scores: list[float], t: int | None) -> list[int]:
    """Positions sorted by (score descending, position ascending), the first t."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if t is None else order[:t]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_rank_against_brute_force(dtype):
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(0, 60))
        values = rng.integers(0, 6, n) if trial % 2 else rng.random(n)  # few distinct values: many exact ties
        scores = torch.as_tensor(values).to(dtype)
        reference = scores.tolist()
        for t in (None, 0, 1, int(rng.integers(0, n + 1)), n, n + 5):
            got = rank(scores, t)
            assert got.dtype == torch.int64
            assert got.tolist() == brute_rank(reference, t), (trial, t)


def test_rank_by_hand_and_refusals():
    scores = torch.tensor([0.5, 2.0, 0.5, 3.0, 2.0])
    assert rank(scores).tolist() == [3, 1, 4, 0, 2]  # 2.0 twice: position 1 before 4; 0.5 twice: 0 before 2
    assert rank(scores, 2).tolist() == [3, 1]
    assert rank(scores, 3).tolist() == [3, 1, 4]  # the tie at the cut goes to the lower position
    assert rank(torch.zeros(0), 3).tolist() == []
    with pytest.raises(StatsError, match="t must be >= 0"):
        rank(scores, -1)


def test_idf_once():
    df = torch.tensor([[0, 1, 3, 7]], dtype=torch.int64)
    stats = SlotStats((2,), 4, "batch", df * 2, df, n_docs=7)
    hand = [math.log(8 / 1), math.log(8 / 2), math.log(8 / 4), math.log(8 / 8)]
    assert idf(df[0], 7).tolist() == pytest.approx(hand, rel=1e-15)
    assert torch.equal(stats.idf(2), idf(df[0], 7)) and stats.idf(2).dtype == torch.float64
