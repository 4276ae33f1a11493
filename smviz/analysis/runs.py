"""Reading a finetuning run directory for analysis: its config, metrics and per-step selections as
DataFrames, and the memory at any step rebuilt from the base model and the run's deltas. Every file is
read through `smviz.train.rundir.FinetuneRunDir`, the owner of the format; errors are RunError (a
`layer=` that names no memory layer of the run: ConfigError, from `smviz.model.resolve_layer`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from smviz.errors import RunError
from smviz.model import MemoryModel, resolve_layer
from smviz.train.rundir import FinetuneRunDir


class Run:
    """A finetuning run directory, read-only. Tables load on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.dir = FinetuneRunDir(path)
        self.path = self.dir.path
        self.identity: dict[str, Any] = self.dir.read_identity()
        self.summary: dict[str, Any] | None = self.dir.summary()
        self._steps: pd.DataFrame | None = None

    def __repr__(self) -> str:
        state = "finished" if self.summary else "unfinished"
        return f"Run({self.path}: {self.method}, {state}, base model {self.base_model_hash})"

    @property
    def config(self) -> dict[str, Any]:
        return self.identity["config"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def base_model_hash(self) -> str:
        return self.identity["base_model_hash"]

    @property
    def model_hash(self) -> str | None:
        """Hash of the finetuned model (None while the run is unfinished)."""
        return None if self.summary is None else self.summary["model_hash"]

    @property
    def model_dir(self) -> Path:
        """The finished run's model directory (`<run>/model`)."""
        return self.dir.model_dir

    @property
    def has_deltas(self) -> bool:
        """The run wrote per-step deltas (value-row methods)."""
        return self.dir.has_deltas()

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per evaluation (metrics.jsonl): step, facts_seen, learn_em, learn_f1, stream_em,
        stream_f1, known_em, known_f1, heldout_nll."""
        return pd.DataFrame(self.dir.metrics())

    @property
    def steps(self) -> pd.DataFrame:
        """One row per step and memory layer (steps.parquet): step, fact_id, fact_index, loss, layer,
        accessed, grad_norm, selected, tf, df, score (the last four are arrays, best first)."""
        if self._steps is None:
            self._steps = self.dir.steps_table().to_pandas()
        return self._steps

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.steps["layer"].unique())

    def resolve_layer(self, layer: int | None) -> int:
        """The memory layer of this run `layer` names (None: the only one); ConfigError otherwise."""
        return resolve_layer(layer, self.layers, what=f"run {self.path}")

    def selected(self, *, by: str = "step", layer: int | None = None) -> dict[Any, np.ndarray]:
        """Selected slot ids (sorted, unique) per step (`by="step"`) or per fact (`by="fact"`: the union
        over the fact's steps), for one memory layer (default: the only one)."""
        if by not in ("step", "fact"):
            raise RunError(f"by must be 'step' or 'fact', got {by!r}")
        layer = self.resolve_layer(layer)
        steps = self.steps[self.steps["layer"] == layer]
        key = "step" if by == "step" else "fact_id"
        out: dict[Any, np.ndarray] = {}
        for k, group in steps.groupby(key, sort=False):
            out[k] = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in group["selected"]]))
        if not any(len(v) for v in out.values()):
            raise RunError(f"run {self.path} selected no slots ({self.method} trains no value rows by selection)")
        return out

    def check_model(self, model: MemoryModel) -> None:
        """Refuse a model that is not this run's base model."""
        if model.model_hash != self.base_model_hash:
            raise RunError(f"run {self.path} started from model {self.base_model_hash}, not {model.model_hash}")

    def delta(self, step: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (rows, values after the step)} of a value-row run's step (1-based)."""
        return self.dir.delta(step)

    @torch.no_grad()
    def rebuild(self, model: MemoryModel, step: int) -> MemoryModel:
        """Put `model` (this run's base model, loaded fresh) into the state after `step` by applying the
        deltas 1..step in order; returns it. Step 0 leaves it as it is."""
        self.check_model(model)
        for s in range(1, step + 1):
            for layer, (rows, values) in self.delta(s).items():
                weight = model.memory_layers[layer].value_table.weight
                weight[rows.to(weight.device)] = values.to(weight.device, weight.dtype)
        model.model_hash = None  # no longer the saved base model
        return model
