"""Run directories, the one reader and writer of them: every file name inside a finetuning run
(`FinetuneRunDir`) and a pretraining run (`PretrainRunDir`) is spelled here and nowhere else. Every write
is atomic (or, for metrics.jsonl, an fsynced append whose torn last line readers skip); JSON is strict.

Finetuning run directory (format `smviz-finetune/1`):
    config.json      the run's identity: the effective FinetuneConfig, base model hash, background-
                     statistics protocol, the stream, the evaluation protocol and its sources (sha256)
    stream.jsonl     the stream's items in their canonical form (`smviz.data.formats.canonical`), in order:
                     what the app and reports show of the run's facts, documents, QA lines or edits
    metrics.jsonl    one line per evaluation (step 0 = before training, every eval_every steps, the end)
    steps.parquet    per step and memory layer (STEP_SCHEMA): fact, loss, distinct slots read, gradient
                     norm, the selected slots with their TF, DF and score (empty lists for full / LoRA)
    deltas/          value-row methods: step-NNNNNN.safetensors with tensors rows.{block} (sorted slot
                     ids) and values.{block} (those rows after the step): the memory at any step is the
                     base model plus deltas 1..s
    checkpoints/     optional full model directories, step-NNNNNN/ (checkpoint_every)
    state/           resume point: trainer.json (step, optimizer layout), optimizer.safetensors and, for
                     full / LoRA, trainable.safetensors; removed when the run finishes
    model/           the finetuned model (LoRA merged), its hash in summary.json
    summary.json     start / end / change of every metric, model hashes, protocol: the run is finished

Pretraining run directory (format `smviz-pretrain/1`): config.json ({format, config}), metrics.jsonl,
checkpoint/ (model/ directory, optimizer.safetensors, trainer.json with step and optimizer layout).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from smviz.errors import RunError
from smviz.io import (
    append_jsonl, atomic_dir, atomic_open, ensure_dir, json_text, write_bytes_atomic, write_json_atomic, write_text_atomic,
)

RUN_FORMAT = "smviz-finetune/1"
PRETRAIN_FORMAT = "smviz-pretrain/1"

STEP_SCHEMA = pa.schema([
    ("step", pa.int32()), ("fact_id", pa.string()), ("fact_index", pa.int32()), ("loss", pa.float32()),
    ("layer", pa.int16()), ("accessed", pa.int32()), ("grad_norm", pa.float32()), ("selected", pa.list_(pa.int32())),
    ("tf", pa.list_(pa.float32())), ("df", pa.list_(pa.int32())), ("score", pa.list_(pa.float32())),
])

CONFIG, METRICS, SUMMARY, STEPS, STREAM = "config.json", "metrics.jsonl", "summary.json", "steps.parquet", "stream.jsonl"
QUESTIONS = "questions.jsonl"  # per evaluation: every question's em and f1 (`smviz.evaluate.protocol.score_point`)
DELTAS, CHECKPOINTS, STATE, MODEL, CHECKPOINT = "deltas", "checkpoints", "state", "model", "checkpoint"
TRAINER, OPTIMIZER, TRAINABLE = "trainer.json", "optimizer", "trainable"  # state files (tensors: NAME.safetensors)


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of a metrics log; a torn last line (an interrupted append) is skipped."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunError(f"{path}, line {i + 1}: not JSON; the log is damaged") from None
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log (a torn last line is skipped)."""
    return [record for _, record in _jsonl_lines(path)]


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop log lines written after step `step` (a resume point; they will be written again)."""
    if path.is_file():
        kept = [line for line, record in _jsonl_lines(path) if record["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path, device=str(device))


class FinetuneRunDir:
    """A finetuning run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FinetuneRunDir({self.path})"

    @property
    def model_dir(self) -> Path:
        """The finished run's model directory."""
        return self.path / MODEL

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / CHECKPOINTS / _step_name(step)

    # ---- identity and summary

    def identity(self) -> dict[str, Any] | None:
        """config.json's content, or None when there is none (or it is unreadable)."""
        return read_json(self.path / CONFIG)

    def holds_files(self) -> bool:
        return self.path.exists() and any(self.path.iterdir())

    def write_identity(self, identity: dict[str, Any]) -> None:
        ensure_dir(self.path)
        write_json_atomic(self.path / CONFIG, identity)

    def write_stream(self, records: list[dict[str, Any]]) -> None:
        """stream.jsonl: the stream's items as canonical JSON objects, in stream order."""
        write_text_atomic(self.path / STREAM, "".join(json_text(r, indent=None) + "\n" for r in records))

    def stream(self) -> list[dict[str, Any]]:
        """stream.jsonl's objects (empty for runs written before it existed)."""
        return read_jsonl(self.path / STREAM)

    def read_identity(self) -> dict[str, Any]:
        """config.json of a run, checked: a RunError when this is not a finetuning run directory."""
        path = self.path / CONFIG
        if not path.is_file():
            raise RunError(f"{self.path} is not a finetuning run (no {CONFIG}); make one with `smviz finetune`")
        try:
            identity = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path} is unreadable ({e})") from None
        if not isinstance(identity, dict) or identity.get("format") != RUN_FORMAT:
            got = identity.get("format") if isinstance(identity, dict) else None
            raise RunError(f"{path} has format {got!r}, expected {RUN_FORMAT!r}")
        return identity

    def summary(self) -> dict[str, Any] | None:
        """summary.json's content; None while the run is unfinished."""
        path = self.path / SUMMARY
        return json.loads(path.read_text()) if path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Mark the run finished: summary.json, then the resume state goes."""
        write_json_atomic(self.path / SUMMARY, summary)
        shutil.rmtree(self.path / STATE, ignore_errors=True)

    # ---- metrics.jsonl

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, [record])

    def truncate_metrics(self, step: int) -> None:
        truncate_jsonl(self.path / METRICS, step)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    # ---- questions.jsonl: {"step", set name: {"id": [...], "em": [...], "f1": [...]}} per evaluation

    def append_questions(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / QUESTIONS, [record])

    def truncate_questions(self, step: int) -> None:
        truncate_jsonl(self.path / QUESTIONS, step)

    def questions(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / QUESTIONS)

    # ---- steps.parquet

    def write_steps(self, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=STEP_SCHEMA)
        with atomic_open(self.path / STEPS, "wb") as f:
            pq.write_table(table, f, compression="zstd")

    def steps_table(self) -> pa.Table:
        path = self.path / STEPS
        if not path.is_file():
            raise RunError(f"{self.path} has no {STEPS} yet (the run has not reached its first evaluation)")
        return pq.read_table(path)

    def steps(self, upto: int) -> list[dict[str, Any]]:
        """The step rows of steps 1..upto (none for upto 0 or before the first evaluation)."""
        if upto == 0 or not (self.path / STEPS).is_file():
            return []
        return [r for r in self.steps_table().to_pylist() if r["step"] <= upto]

    # ---- deltas/

    def has_deltas(self) -> bool:
        return (self.path / DELTAS).is_dir()

    def delta_steps(self) -> list[int]:
        """Steps with a delta file, ascending."""
        if not self.has_deltas():
            return []
        return sorted(int(f.stem.split("-")[1]) for f in (self.path / DELTAS).glob("step-*.safetensors"))

    def write_delta(self, step: int, delta: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """{block: (sorted rows, their values after the step)} of step `step` (1-based)."""
        tensors = {}
        for block, (rows, values) in delta.items():
            tensors[f"rows.{block}"] = rows.cpu().contiguous()
            tensors[f"values.{block}"] = values.cpu().contiguous()
        write_bytes_atomic(self.path / DELTAS / f"{_step_name(step)}.safetensors", safetensors.torch.save(tensors))

    def delta(self, step: int, device: torch.device | str = "cpu") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{block: (rows, values after the step)} of step `step` (1-based)."""
        path = self.path / DELTAS / f"{_step_name(step)}.safetensors"
        if not path.is_file():
            raise RunError(f"{path} does not exist: the run has no deltas for step {step} (value-row methods write one per step)")
        saved = load_tensors(path, device)
        blocks = sorted({int(k.split(".")[1]) for k in saved})
        return {block: (saved[f"rows.{block}"], saved[f"values.{block}"]) for block in blocks}

    def drop_deltas_after(self, step: int) -> None:
        """Delete the deltas of steps after `step` (written after the resume point: they run again)."""
        for s in self.delta_steps():
            if s > step:
                (self.path / DELTAS / f"{_step_name(s)}.safetensors").unlink()

    # ---- state/ (the resume point)

    def save_state(self, layout: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """The resume point: trainer.json = `layout` (with its `step`), one NAME.safetensors per entry
        of `tensors` (OPTIMIZER, TRAINABLE)."""
        with atomic_dir(self.path / STATE) as tmp:
            for name, group in tensors.items():
                safetensors.torch.save_file(group, tmp / f"{name}.safetensors")
            write_json_atomic(tmp / TRAINER, layout)

    def state(self) -> dict[str, Any] | None:
        """trainer.json of the resume point (None: no resume point)."""
        return read_json(self.path / STATE / TRAINER)

    def state_tensors(self, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return load_tensors(self.path / STATE / f"{name}.safetensors", device)


class PretrainRunDir:
    """A pretraining run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def config(self) -> dict[str, Any] | None:
        """The recorded config (a dict), or None when the run has none yet."""
        saved = read_json(self.path / CONFIG)
        return saved.get("config") if isinstance(saved, dict) else None

    def claim(self, config: dict[str, Any]) -> None:
        """Bind the directory to `config`: write it for a new run, refuse another run's directory."""
        if (self.path / CONFIG).is_file():
            if self.config() != json.loads(json_text(config, indent=None)):  # as config.json holds it
                raise RunError(f"{self.path} holds a run with a different config; choose another name or delete it")
            return
        ensure_dir(self.path)
        write_json_atomic(self.path / CONFIG, {"format": PRETRAIN_FORMAT, "config": config})

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, [record])

    def truncate_metrics(self, step: int) -> None:
        truncate_jsonl(self.path / METRICS, step)

    def clear_metrics(self) -> None:
        (self.path / METRICS).unlink(missing_ok=True)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    @property
    def checkpoint_model_dir(self) -> Path:
        return self.path / CHECKPOINT / MODEL

    def checkpoint(self) -> dict[str, Any] | None:
        """trainer.json of the last checkpoint (step, optimizer layout); None before the first."""
        return read_json(self.path / CHECKPOINT / TRAINER)

    def checkpoint_optimizer(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / CHECKPOINT / f"{OPTIMIZER}.safetensors")

    def save_checkpoint(self, save_model: Callable[[Path], Any], optimizer: dict[str, torch.Tensor],
                        layout: dict[str, Any]) -> None:
        """A checkpoint, replacing the last one only once complete: `save_model(dir)` writes the model,
        then the optimizer tensors and trainer.json = `layout` (with its `step`)."""
        with atomic_dir(self.path / CHECKPOINT) as tmp:
            save_model(tmp / MODEL)
            safetensors.torch.save_file(optimizer, tmp / f"{OPTIMIZER}.safetensors")
            write_text_atomic(tmp / TRAINER, json_text(layout, indent=None) + "\n")
