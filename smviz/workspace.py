"""The on-disk layout of a workspace — the one place that knows its paths (see DESIGN.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def pretrain_run(self, name: str) -> Path:
        """Pretraining state of model `name`: config, metrics.jsonl, checkpoint/."""
        return self.root / "pretrain" / name

    def trace(self, name: str) -> Path:
        return self.root / "traces" / name

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    @property
    def reports(self) -> Path:
        return self.root / "reports"
