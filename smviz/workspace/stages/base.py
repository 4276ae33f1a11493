"""What a stage of a workspace is (`Stage`: a `done` check, a `run`, and the lines the demo shows),
the settings the demo's stages share (`Plan`), and the check of a length given against the model's
maximum positions (`check_length`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smviz.data.world import WorldConfig
from smviz.errors import ConfigError
from smviz.model import MemoryModel, verify_model_dir
from smviz.train.pretrain import PretrainConfig
from smviz.workspace.layout import Workspace


@dataclass
class Plan:
    """The settings of one demo: its workspace, the model's name and pretraining config, and what the
    later stages do with it. `model` is the pretrained model, loaded (verified) on first use when the
    pretraining stage was skipped."""

    ws: Workspace
    name: str
    config: PretrainConfig
    device: torch.device
    world: WorldConfig
    stats_batches: int
    stream: dict[str, Any]
    methods: tuple[str, ...]
    trace_name: str
    loaded: MemoryModel | None = field(default=None, repr=False)

    @property
    def model_dir(self) -> Path:
        return self.ws.model(self.name)

    @property
    def model(self) -> MemoryModel:
        if self.loaded is None:
            verify_model_dir(self.model_dir)
            self.loaded = MemoryModel.from_pretrained(self.model_dir, device=self.device)
        return self.loaded


@dataclass(frozen=True)
class Stage:
    """One stage of a workspace. `done(plan)`: its output is already there (the demo skips it);
    `run(plan)`: does the work and returns the line saying what it wrote; `title(plan)`: what it does,
    shown before it runs; `skipped(plan)`: where its output already is; `report(plan)`, if any: what
    the demo shows of its output afterwards, run or skipped."""

    name: str
    title: Callable[[Plan], str]
    done: Callable[[Plan], bool]
    run: Callable[[Plan], str]
    skipped: Callable[[Plan], str]
    report: Callable[[Plan], str] | None = None


def max_positions(model: MemoryModel) -> int | None:
    """The most positions the model's HF config allows (None when it sets no limit)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_length(name: str, value: int, model: MemoryModel) -> None:
    """ConfigError unless `value` tokens per row is >= 1 and within the model's maximum positions."""
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    limit = max_positions(model)
    if limit is not None and value > limit:
        raise ConfigError(f"{name} {value} is longer than the model's maximum of {limit} positions")
