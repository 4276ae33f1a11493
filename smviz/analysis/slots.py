"""One slot across a trace and a run, for a slot's page: what else its readers read (`co_accessed`),
where and how highly a run selected it (`selection_history`), and its value row's norm after every
step (`value_norm_history`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from smviz.analysis.runs import Run
from smviz.analysis.tfidf import step_table
from smviz.errors import ConfigError
from smviz.model import MemoryModel
from smviz.trace import SlotIndex


def co_accessed(index: SlotIndex, slot: int, *, layer: int | None = None, readers: int = 200, top: int = 20) -> pd.DataFrame:
    """Slots read by the same tokens as `slot`: over its `readers` strongest reading tokens (as
    `SlotIndex.contexts` ranks them), how many of their reads (all heads, all of the top-k) went to
    each other slot. Columns: slot, co_reads, share (of those tokens' reads of other slots); the `top`
    largest, ties to the lower id."""
    rows = index.contexts(slot, n=readers, window=0, layer=layer)["row"].to_numpy()
    if len(rows) == 0:
        return pd.DataFrame({"slot": pd.Series(dtype=np.int64), "co_reads": pd.Series(dtype=np.int64), "share": pd.Series(dtype=float)})
    reads = index.reads_of_rows(rows, layer=layer)
    counts = np.bincount(reads["slot"].to_numpy(), minlength=index.trace.n_slots)
    counts[slot] = 0
    order = np.argsort(-counts, kind="stable")[:top]
    order = order[counts[order] > 0]
    total = max(int(counts.sum()), 1)
    return pd.DataFrame({"slot": order.astype(np.int64), "co_reads": counts[order], "share": counts[order] / total})


def selection_history(run: Run, *, layer: int | None = None) -> pd.DataFrame:
    """Every stored selection of the run, one row per (step, selected slot): the columns of
    `smviz.analysis.tfidf.step_table` (step, fact_id, layer, rank, slot, tf, df, score, selected)."""
    layers = run.layers if layer is None else [run.resolve_layer(layer)]
    frames = [step_table(run, int(s), layer=lay) for s in sorted(run.steps["step"].unique()) for lay in layers]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "fact_id", "layer", "rank", "slot", "score"])


@torch.no_grad()
def value_norm_history(run: Run, base: MemoryModel, slot: int, *, layer: int | None = None) -> pd.DataFrame:
    """‖V[slot]‖ after every step of a sparse run (step 0: `base`, the run's base model), read from
    the run's deltas. Columns: step, norm, changed (the step wrote this row)."""
    run.check_model(base)
    layer = run.resolve_layer(layer)
    weight = base.memory_layers[layer].value_table.weight
    if not 0 <= slot < weight.shape[0]:
        raise ConfigError(f"slot {slot} is out of range: the memory has {weight.shape[0]} slots")
    norm = float(weight[slot].float().norm())
    rows = [{"step": 0, "norm": norm, "changed": False}]
    for s in sorted(int(x) for x in run.steps["step"].unique()):
        rows_s, values = run.delta(s)[layer]
        hit = torch.nonzero(rows_s == slot).flatten()
        if len(hit):
            norm = float(values[int(hit[0])].float().norm())
        rows.append({"step": s, "norm": norm, "changed": bool(len(hit))})
    return pd.DataFrame(rows)
