"""Learning against forgetting across finetuning runs: a run's curve with its forgetting measured from
its own start (`forgetting_curve`), the point where a run reaches a given learning level, interpolated
along its curve (`at_learning`, `crossing`: the paper's "same level of new knowledge acquisition"), and
mean ± std over seeds (`mean_std`). `analyses/continual_facts.py` builds its tables and figures from these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from smviz.errors import AnalysisError

# What a curve row carries beyond metrics.jsonl: drops are relative to the run's own start (step 0),
# as the paper's headline numbers are (each method from its own base point).
CURVE_COLUMNS = ("known_drop", "known_f1_drop", "nll_change")


def forgetting_curve(metrics: pd.DataFrame) -> pd.DataFrame:
    """`metrics` (a run's metrics.jsonl, `Run.metrics`) sorted by step, with known_drop and
    known_f1_drop (relative drop of known-fact EM / F1 from step 0) and nll_change (held-out NLL minus
    its step-0 value)."""
    needed = {"step", "stream_em", "known_em", "known_f1", "heldout_nll"}
    missing = needed - set(metrics.columns)
    if missing:
        raise AnalysisError(f"metrics lack columns {sorted(missing)}; expected a finetuning run's metrics.jsonl")
    curve = metrics.sort_values("step").reset_index(drop=True).copy()
    if curve.empty or curve["step"].iloc[0] != 0:
        raise AnalysisError("a curve starts with the evaluation before training (step 0), and this one has none")
    start = curve.iloc[0]

    def drop(column: str) -> pd.Series:
        return (start[column] - curve[column]) / start[column] if start[column] else pd.Series(np.nan, index=curve.index)

    curve["known_drop"] = drop("known_em")
    curve["known_f1_drop"] = drop("known_f1")
    curve["nll_change"] = curve["heldout_nll"] - start["heldout_nll"]
    return curve


def at_learning(curve: pd.DataFrame, level: float, *, learning: str = "stream_em",
                columns: Sequence[str] = CURVE_COLUMNS) -> dict[str, float] | None:
    """`columns` at the first point where `curve[learning]` reaches `level`, linearly interpolated
    between the two evaluations around the crossing (steps too); None if the run never reaches it.
    A curve that starts at or above `level` gives its start."""
    found = crossing(curve[learning].to_numpy(dtype=float), level)
    if found is None:
        return None
    lo, i, frac = found
    out = {"level": float(level)}
    for column in ("step", *columns):
        a = float(curve[column].iloc[lo])
        b = float(curve[column].iloc[i])
        out[column] = a + frac * (b - a)
    return out


def crossing(learning: np.ndarray, level: float) -> tuple[int, int, float] | None:
    """Where a learning curve (values at successive evaluations) first reaches `level`: (lo, hi, frac)
    with the point at (1 − frac)·[lo] + frac·[hi] (lo = hi = 0 when it starts there); None if never."""
    reached = np.flatnonzero(learning >= level)
    if len(reached) == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return 0, 0, 0.0
    return i - 1, i, float((level - learning[i - 1]) / (learning[i] - learning[i - 1]))


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the values that are not
    None or NaN, with n = how many there were."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None, "n": len(kept)}
