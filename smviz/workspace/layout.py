"""Where everything of a workspace lies on disk — the one module that spells its folders and the names
of the files it holds directly (DESIGN.md, "The workspace"). What is inside a model, trace or run
directory is named by that format's own module; this module only says where those directories are.

    <workspace>/
      data/                 world.json, facts-known.jsonl, facts-bio.jsonl, facts-new.jsonl,
                            corpus-train.jsonl, corpus-heldout.jsonl
      tokenizer/            the workspace tokenizer (tokenizer.json, HF format)
      pretrain/NAME/        the pretraining run of model NAME (its files: smviz.train.rundir)
      models/NAME/          model directories (smviz.model)
      traces/NAME/          trace directories (smviz.trace)
      runs/NAME/            finetuning run directories (smviz.train.rundir)
      reports/              pretrain-NAME.json (the evaluation of pretrained model NAME),
                            stream-facts.jsonl, diff-METHOD.html/.json, runs.html/.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = "data"
TOKENIZER_DIR = "tokenizer"
PRETRAIN_DIR = "pretrain"
MODELS_DIR = "models"
TRACES_DIR = "traces"
RUNS_DIR = "runs"
REPORTS_DIR = "reports"

WORLD_FILE = "world.json"
POPULATION_FILES = {"known": "facts-known.jsonl", "bio_only": "facts-bio.jsonl", "new": "facts-new.jsonl"}
FACTS_GLOB = "facts-*.jsonl"  # every facts file of data/ (the populations and any the user adds)
CORPUS_FILES = {"train": "corpus-train.jsonl", "heldout": "corpus-heldout.jsonl"}
TOKENIZER_FILE = "tokenizer.json"  # present once the workspace tokenizer is saved
STREAM_FACTS_FILE = "stream-facts.jsonl"
RUNS_REPORT = "runs.html"


@dataclass(frozen=True)
class Workspace:
    """The paths of the workspace at `root` (nothing is created or read)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_model(cls, model_dir: str | os.PathLike) -> Workspace | None:
        """The workspace holding `model_dir` when it is WS/models/NAME, else None."""
        parent = Path(model_dir).resolve().parent
        return cls(parent.parent) if parent.name == MODELS_DIR else None

    # ---- data/

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def world_file(self) -> Path:
        return self.data / WORLD_FILE

    def facts(self, population: str) -> Path:
        """The facts file of a population of the world: known, bio_only or new."""
        return self.data / POPULATION_FILES[population]

    def corpus(self, split: str) -> Path:
        """The corpus file of a split: train or heldout."""
        return self.data / CORPUS_FILES[split]

    # ---- tokenizer/ and pretrain/

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def tokenizer_file(self) -> Path:
        return self.tokenizer / TOKENIZER_FILE

    def pretrain_run(self, name: str) -> Path:
        """The pretraining run of model `name` (config, metrics.jsonl, checkpoint/)."""
        return self.root / PRETRAIN_DIR / name

    # ---- models/, traces/, runs/

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS_DIR

    def model(self, name: str) -> Path:
        return self.models_dir / name

    @property
    def traces_dir(self) -> Path:
        return self.root / TRACES_DIR

    def trace(self, name: str) -> Path:
        return self.traces_dir / name

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    def run(self, name: str) -> Path:
        return self.runs_dir / name

    # ---- reports/

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR

    def pretrain_eval(self, name: str) -> Path:
        """The evaluation of pretrained model `name` (what `smviz pretrain` and the demo write)."""
        return self.reports / f"pretrain-{name}.json"

    @property
    def stream_facts(self) -> Path:
        """The facts of the demo's streams, for the diff report."""
        return self.reports / STREAM_FACTS_FILE

    def diff_report(self, run: str) -> Path:
        """The diff report of run `run` (base model → its finetuned model); its JSON lies beside it."""
        return self.reports / f"diff-{run}.html"

    @property
    def runs_report(self) -> Path:
        return self.reports / RUNS_REPORT
