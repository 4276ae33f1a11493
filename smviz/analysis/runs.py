"""Reading a finetuning run directory (smviz.train.finetune) for analysis: its config, metrics and
per-step selections as DataFrames, and the memory at any step rebuilt from the base model and the
run's deltas."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import safetensors.torch
import torch

from smviz.errors import SmvizError
from smviz.model import MemoryModel
from smviz.train.finetune import RUN_FORMAT


class RunError(SmvizError):
    """A run directory is missing, incomplete, or does not belong to the model it is used with."""


class Run:
    """A finetuning run directory, read-only. Tables load on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise RunError(f"{self.path} is not a finetuning run (no config.json); make one with `smviz finetune`")
        try:
            self.identity: dict[str, Any] = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{config} is unreadable ({e})") from None
        if self.identity.get("format") != RUN_FORMAT:
            raise RunError(f"{config} has format {self.identity.get('format')!r}, expected {RUN_FORMAT!r}")
        summary = self.path / "summary.json"
        self.summary: dict[str, Any] | None = json.loads(summary.read_text()) if summary.is_file() else None
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
    def metrics(self) -> pd.DataFrame:
        """One row per evaluation (metrics.jsonl): step, facts_seen, learn_em, learn_f1, stream_em,
        stream_f1, known_em, known_f1, heldout_nll."""
        path = self.path / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        return pd.DataFrame(rows)

    @property
    def steps(self) -> pd.DataFrame:
        """One row per step and memory layer (steps.parquet): step, fact_id, fact_index, loss, layer,
        accessed, grad_norm, selected, tf, df, score (the last four are arrays, best first)."""
        if self._steps is None:
            path = self.path / "steps.parquet"
            if not path.is_file():
                raise RunError(f"{self.path} has no steps.parquet yet (the run has not reached its first evaluation)")
            self._steps = pq.read_table(path).to_pandas()
        return self._steps

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.steps["layer"].unique())

    def selected(self, *, by: str = "step", layer: int | None = None) -> dict[Any, np.ndarray]:
        """Selected slot ids (sorted, unique) per step (`by="step"`) or per fact (`by="fact"`: the union
        over the fact's steps), for one memory layer (default: the only one)."""
        if by not in ("step", "fact"):
            raise RunError(f"by must be 'step' or 'fact', got {by!r}")
        layer = self._layer(layer)
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
        """{layer: (rows, values after the step)} of a sparse run's step (1-based)."""
        path = self.path / "deltas" / f"step-{step:06d}.safetensors"
        if not path.is_file():
            raise RunError(f"{path} does not exist: the run has no deltas for step {step} (sparse methods write one per step)")
        saved = safetensors.torch.load_file(path)
        layers = sorted({int(k.split(".")[1]) for k in saved})
        return {layer: (saved[f"rows.{layer}"], saved[f"values.{layer}"]) for layer in layers}

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

    def _layer(self, layer: int | None) -> int:
        layers = self.layers
        if layer is None:
            if len(layers) != 1:
                raise RunError(f"run {self.path} has memory layers {layers}; say which one (layer=...)")
            return layers[0]
        if layer not in layers:
            raise RunError(f"layer {layer} is not a memory layer of run {self.path} ({layers})")
        return layer
