"""The minimum trainable t at which a fact's answer becomes correct (paper §6, Table 1): on demand, a
copy of the base model learns the fact alone with sparse memory finetuning at each t of a sweep
(through the public `smviz.train.Trainer`, as `finetune` trains)."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from smviz.errors import AnalysisError
from smviz.stats import SlotStats

if TYPE_CHECKING:
    from smviz.analysis.runs import Run
    from smviz.data.facts import Fact
    from smviz.model import MemoryModel

DEFAULT_TS = (25, 50, 100, 200, 500, 1000)


def min_t_sweep(
    model: MemoryModel | str | os.PathLike,
    stats: SlotStats,
    fact: Fact,
    ts: Sequence[int] = DEFAULT_TS,
    *,
    run: Run | None = None,
    lr: float | None = None,
    steps_per_fact: int | None = None,
    batch_size: int | None = None,
    composition: str | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """For each t in `ts`: finetune a fresh copy of the base `model` (a MemoryModel, left unchanged, or a
    model directory) on `fact` alone with sparse memory finetuning (TF-IDF top-t against `stats`, plain
    SGD), then ask the fact's held-out questions (`smviz.evaluate.answer_questions`). t = 0 is the
    untrained model. Training settings come from `run`'s config when given (its lr, steps_per_fact,
    batch_size, composition, seed; the model must be its base model), else from the arguments, else
    from `FinetuneConfig`'s defaults; explicit arguments override the run's.

    Columns: t, em, f1 (means over the held-out questions), n_questions, loss (last step's; NaN at t=0).
    `df.attrs["min_t"]` is the smallest t with em > 0 (None when none) — see `min_t`."""
    import torch

    from smviz.evaluate import answer_questions
    from smviz.model import MemoryModel
    from smviz.train import Stream, FinetuneConfig, Trainer

    ts = [int(t) for t in ts]
    if not ts or any(t < 0 for t in ts):
        raise AnalysisError(f"ts must be a non-empty list of t >= 0, got {ts}")
    if not fact.heldout_questions:
        raise AnalysisError(f"fact {fact.id!r} has no held-out questions to evaluate")
    base = MemoryModel.from_pretrained(model, device=device) if isinstance(model, (str, os.PathLike)) else model
    if run is not None:
        run.check_model(base)
    stats.check_model(base)
    n_slots = base.memory_config.n_slots
    bad = [t for t in ts if t > n_slots]
    if bad:
        raise AnalysisError(f"t values {bad} exceed the memory's {n_slots} slots")
    cfg = dict(run.config) if run is not None else {}
    settings = {"lr": lr, "steps_per_fact": steps_per_fact, "batch_size": batch_size, "composition": composition, "seed": seed}
    for k, v in settings.items():
        if v is not None:
            cfg[k] = v
    keep = {"lr", "steps_per_fact", "batch_size", "composition", "seed"}
    rows = []
    for t in ts:
        m = copy.deepcopy(base)
        loss = float("nan")
        if t > 0:
            config = FinetuneConfig(method="sparse", top_t=t, optimizer="sgd",
                                    **{k: v for k, v in cfg.items() if k in keep}).resolved()
            m.eval()
            trainer = Trainer(m, config, stats, m.device)
            stream = Stream([fact], m.tokenizer, batch_size=config.batch_size, steps_per_item=config.steps_per_fact,
                            composition=config.composition, seed=config.seed)
            for step in range(len(stream)):
                batch = {k: v.to(m.device) for k, v in stream.batch(step).items()}
                loss = trainer.step(batch, step)[0]
            m = trainer.final_model()
        with torch.no_grad():
            answers = answer_questions(m, [fact], heldout=True)
        rows.append({"t": t, "em": float(np.mean([a["em"] for a in answers])), "f1": float(np.mean([a["f1"] for a in answers])),
                     "n_questions": len(answers), "loss": loss})
        del m
    out = pd.DataFrame(rows, columns=["t", "em", "f1", "n_questions", "loss"])
    out.attrs["min_t"] = min_t(out)
    out.attrs["fact_id"] = fact.id
    return out


def min_t(sweep: pd.DataFrame) -> int | None:
    """The smallest t of a `min_t_sweep` table at which the fact is answered (em > 0); None if never."""
    hit = sweep.loc[sweep["em"] > 0, "t"]
    return None if hit.empty else int(hit.min())


