"""Intervals and paired tests for forgetting studies: percentile bootstrap intervals over seeds, and
over seeds and questions together (two-level, so that both the few seeds and the finite probe count),
paired between methods where the same seeds (the same facts) and the same questions are compared, and
a sign-flip permutation test of paired differences (exact when the flips can be enumerated).

Forgetting here is the relative drop of a probe's mean score, (mean start − mean end) / mean start,
per seed, averaged over seeds; `start` is the base model's per-question score (one vector: every seed
starts from the same model) and `end` one row of per-question scores per seed (fractional where a
matched-learning point interpolates between two evaluations). All resampling is vectorised: weights
of a resample are multinomial counts, so a statistic of B resamples is a few matrix products."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from smviz.errors import SmvizError

DEFAULT_RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval at `level`; n: the units it averages."""

    estimate: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    def to_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}

    def format(self, pct: bool = False, digits: int = 3, sign: bool = False) -> str:
        """'12.6 % [8.1, 17.0]' (pct) or '0.150 [0.120, 0.180]'."""
        scale, d = (100.0, 1) if pct else (1.0, digits)
        spec = f"+.{d}f" if sign else f".{d}f"
        unit = " %" if pct else ""
        return f"{self.estimate * scale:{spec}}{unit} [{self.lo * scale:{spec}}, {self.hi * scale:{spec}}]"


def _weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n) multinomial counts: each row one bootstrap resample of n units."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(estimate: float, samples: np.ndarray, n: int, level: float) -> Interval:
    samples = samples[np.isfinite(samples)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha]) if len(samples) else (np.nan, np.nan)
    return Interval(float(estimate), float(lo), float(hi), n, level)


def mean_interval(values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of `values` (e.g. one number per seed) with its bootstrap interval over them."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise SmvizError(f"mean_interval needs a non-empty 1-d array, got shape {x.shape}")
    w = _weights(np.random.default_rng(seed), len(x), resamples)
    return _interval(x.mean(), w @ x / len(x), len(x), level)


def _check(start: np.ndarray, ends: list[np.ndarray]) -> None:
    if start.ndim != 1 or len(start) == 0:
        raise SmvizError(f"start must hold one score per question, got shape {start.shape}")
    for end in ends:
        if end.ndim != 2 or end.shape[1] != len(start) or end.shape[0] == 0:
            raise SmvizError(f"end must be (seeds, {len(start)} questions), got shape {end.shape}")
    if start.mean() == 0:
        raise SmvizError("the start scores are all 0: a relative drop is undefined")


def relative_drop(start, end) -> float:
    """Mean over seeds of (mean start − mean end) / mean start; `end` is (seeds, questions)."""
    start, end = np.asarray(start, dtype=np.float64), np.atleast_2d(np.asarray(end, dtype=np.float64))
    _check(start, [end])
    return float(((start.mean() - end.mean(axis=1)) / start.mean()).mean())


def _drop_samples(start: np.ndarray, end: np.ndarray, wq: np.ndarray, ws: np.ndarray) -> np.ndarray:
    s = wq @ start  # (B,) resampled start sums (the 1/Q cancels in the ratio)
    e = wq @ end.T  # (B, seeds)
    with np.errstate(divide="ignore", invalid="ignore"):
        drops = (s[:, None] - e) / s[:, None]
    return (drops * ws).sum(axis=1) / end.shape[0]


def drop_interval(start, end, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """`relative_drop` with its two-level bootstrap interval: seeds and questions resampled together.
    A resample whose questions all start at 0 (drop undefined) is left out."""
    start, end = np.asarray(start, dtype=np.float64), np.atleast_2d(np.asarray(end, dtype=np.float64))
    _check(start, [end])
    rng = np.random.default_rng(seed)
    wq, ws = _weights(rng, len(start), resamples), _weights(rng, end.shape[0], resamples)
    return _interval(relative_drop(start, end), _drop_samples(start, end, wq, ws), end.shape[0], level)


def drop_difference(start, end_a, end_b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> Interval:
    """relative_drop(a) − relative_drop(b) with its paired two-level interval: rows of `end_a` and
    `end_b` are the same seeds (the same facts learned), columns the same questions, and every
    resample draws them once for both."""
    start = np.asarray(start, dtype=np.float64)
    end_a, end_b = (np.atleast_2d(np.asarray(e, dtype=np.float64)) for e in (end_a, end_b))
    _check(start, [end_a, end_b])
    if end_a.shape != end_b.shape:
        raise SmvizError(f"paired ends need the same seeds and questions, got {end_a.shape} and {end_b.shape}")
    rng = np.random.default_rng(seed)
    wq, ws = _weights(rng, len(start), resamples), _weights(rng, end_a.shape[0], resamples)
    samples = _drop_samples(start, end_a, wq, ws) - _drop_samples(start, end_b, wq, ws)
    return _interval(relative_drop(start, end_a) - relative_drop(start, end_b), samples, end_a.shape[0], level)


def sign_flip_test(differences, *, permutations: int = DEFAULT_RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of paired `differences` under the null that each is as likely positive as
    negative (method labels exchangeable within a pair): the share of sign flips whose |mean| is at
    least the observed one. Exact (every flip) when 2^n ≤ `permutations`, else `permutations` random
    flips with the observed one counted in, (1 + hits) / (1 + permutations)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise SmvizError(f"sign_flip_test needs a non-empty 1-d array, got shape {d.shape}")
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)  # flips that tie the observed mean count as extreme
    if 2 ** len(d) <= permutations:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= observed - tol))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(permutations, len(d)))
    hits = int(np.sum(np.abs(signs @ d / len(d)) >= observed - tol))
    return (1 + hits) / (1 + permutations)


def drop_difference_test(start, end_a, end_b, *, permutations: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Paired sign-flip tests of relative_drop(a) − relative_drop(b): over seeds (per-seed drop
    differences; few seeds make this coarse: 5 seeds cannot go below p = 1/16) and over questions
    (each question's seed-mean score difference, b − a, divided by the start mean: these average to the
    drop difference exactly)."""
    start = np.asarray(start, dtype=np.float64)
    end_a, end_b = (np.atleast_2d(np.asarray(e, dtype=np.float64)) for e in (end_a, end_b))
    _check(start, [end_a, end_b])
    per_seed = ((end_b - end_a).mean(axis=1)) / start.mean()
    per_question = (end_b - end_a).mean(axis=0) / start.mean()
    return {"difference": float(per_seed.mean()),
            "p_seeds": sign_flip_test(per_seed, permutations=permutations, seed=seed), "seeds": len(per_seed),
            "p_questions": sign_flip_test(per_question, permutations=permutations, seed=seed), "questions": len(per_question)}
