"""Bootstrap intervals and sign-flip tests (`smviz.analysis.intervals`) against hand-computed values,
exhaustive enumeration and scipy's bootstrap and permutation test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from smviz.analysis.intervals import (
    drop_difference,
    drop_difference_test,
    drop_interval,
    mean_interval,
    relative_drop,
    sign_flip_test,
)
from smviz.errors import SmvizError


def test_relative_drop_by_hand():
    start = [1, 1, 0, 1]  # mean 0.75
    end = [[1, 0, 0, 1], [0, 0, 0, 1]]  # means 0.5 and 0.25: drops 1/3 and 2/3
    assert relative_drop(start, end) == pytest.approx(0.5)
    assert relative_drop(start, [1, 1, 0, 1]) == 0.0  # one seed as a vector
    with pytest.raises(SmvizError, match="all 0"):
        relative_drop([0, 0], [[0, 0]])
    with pytest.raises(SmvizError, match=r"end must be \(seeds, 4 questions\)"):
        relative_drop(start, [[1, 0, 1]])


def test_sign_flip_test_by_hand_and_against_scipy():
    # d = (1, 2, 3): of the 8 flips only (+,+,+) and (-,-,-) reach |mean| 2
    assert sign_flip_test([1, 2, 3]) == 0.25
    assert sign_flip_test([0.5, -0.5]) == 1.0
    rng = np.random.default_rng(3)
    d = rng.normal(0.4, 1.0, size=9)
    exact = sign_flip_test(d)
    ref = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                       alternative="two-sided").pvalue
    assert exact == pytest.approx(ref, abs=1e-12)
    # by enumeration, independently
    flips = np.array(list(itertools.product((1, -1), repeat=len(d))))
    assert exact == np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12)
    # random flips when there are too many to enumerate: close to the exact value
    d16 = rng.normal(0.3, 1.0, size=16)
    exact16 = sign_flip_test(d16, permutations=2**16)
    sampled = sign_flip_test(d16, permutations=20_000, seed=1)
    assert sampled == pytest.approx(exact16, abs=0.015) and sampled != exact16


def test_mean_and_drop_intervals_match_scipys_percentile_bootstrap():
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 0.05, size=12)
    mine = mean_interval(x, resamples=20_000)
    ref = scipy_stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20_000, random_state=1).confidence_interval
    assert mine.estimate == pytest.approx(x.mean()) and mine.n == 12
    assert (mine.lo, mine.hi) == pytest.approx((ref.low, ref.high), abs=0.004)
    # one seed: the two-level bootstrap is a paired bootstrap over questions of the ratio
    start = (rng.random(300) < 0.8).astype(float)
    end = start * (rng.random(300) < 0.85)
    mine = drop_interval(start, end[None, :], resamples=20_000)

    def ratio(s, e, axis=-1):
        return (s.mean(axis=axis) - e.mean(axis=axis)) / s.mean(axis=axis)

    ref = scipy_stats.bootstrap((start, end), ratio, paired=True, vectorized=True, method="percentile",
                                n_resamples=20_000, random_state=2).confidence_interval
    assert mine.estimate == pytest.approx(ratio(start, end))
    assert (mine.lo, mine.hi) == pytest.approx((ref.low, ref.high), abs=0.01)
    assert mine.lo < mine.estimate < mine.hi
    # nothing forgotten anywhere: a point
    assert drop_interval(start, np.stack([start, start])).to_dict() | {"level": 0.95} == {
        "estimate": 0.0, "lo": 0.0, "hi": 0.0, "n": 2, "level": 0.95}


def test_two_level_interval_widens_with_seed_spread_and_pairing_narrows_the_difference():
    rng = np.random.default_rng(5)
    start = (rng.random(200) < 0.7).astype(float)
    keep = rng.random((5, 200))
    calm = start * (keep < 0.8)  # every seed forgets about 20 %
    spread = start * (keep < np.array([0.5, 0.65, 0.8, 0.9, 0.95])[:, None])  # seeds differ a lot
    assert drop_interval(start, spread).hi - drop_interval(start, spread).lo > \
        drop_interval(start, calm).hi - drop_interval(start, calm).lo
    # b forgets the same questions as a plus a few more: the paired difference is tight and excludes 0
    more = calm * (rng.random((5, 200)) < 0.9)
    diff = drop_difference(start, calm, more)
    assert diff.estimate == pytest.approx(relative_drop(start, calm) - relative_drop(start, more))
    assert diff.hi < 0
    a, b = drop_interval(start, calm), drop_interval(start, more)
    assert diff.hi - diff.lo < (a.hi - a.lo) + (b.hi - b.lo)
    test = drop_difference_test(start, calm, more)
    assert test["difference"] == pytest.approx(diff.estimate)
    assert test["p_seeds"] == pytest.approx(2 / 32)  # 5 seeds, every one the same sign: the floor
    assert test["p_questions"] < 0.01 and (test["seeds"], test["questions"]) == (5, 200)
    with pytest.raises(SmvizError, match="same seeds and questions"):
        drop_difference(start, calm, more[:3])
