"""Checkpoint diffs: what changed between two models (or two steps of a finetuning run) — per value
row, with an audit of every parameter outside what the method was allowed to touch (how access
patterns and answers shifted is `smviz.analysis.shift`).

- `diff_models(before, after, allowed=..., method=...)` → `ModelDiff(slots, audit)`;
- `diff_run_steps(run, base_model_dir, step_a, step_b)` rebuilds both states from the run's deltas;
- `diff_run_model(run, base_model_dir)`: the base model against the run's final model;
- `run_diff(run, before, after)`: two given models, audited with what the run's method allows, after
  checking that `after` is the run's final model (`check_run_model`).

The audit is how a user catches an optimizer that silently moves frozen rows: every parameter (and
buffer) is compared bit for bit, the value tables split into the allowed rows and all other rows. What
a method may change comes from the method registry (`smviz.train.methods`, `smviz.train.params`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from smviz.analysis.runs import Run
from smviz.errors import AnalysisError, RunError
from smviz.model import MemoryModel, resolve_layer
from smviz.train.methods import VALUE_ROWS, get_method
from smviz.train.params import VALUE_ROWS_KIND, may_change, model_tensors, parameter_kinds

SLOT_COLUMNS = ["layer", "slot", "delta_norm", "before_norm", "after_norm", "relative_change", "allowed"]
AUDIT_COLUMNS = ["parameter", "part", "kind", "numel", "changed", "max_abs_change", "bit_identical", "allowed", "violation"]


class ModelDiff(NamedTuple):
    """The result of `diff_models` (unpacks as `slots, audit = diff_models(...)`)."""

    slots: pd.DataFrame
    """One row per changed value row (any element not bit-identical), by layer then ‖ΔV‖ descending.
    Columns: layer (block of the memory layer that owns the table; a shared table is reported once,
    under its first layer), slot, delta_norm (‖V_after − V_before‖₂ of the row, float64),
    before_norm, after_norm, relative_change (delta_norm / before_norm; inf when before_norm is 0),
    allowed (the row was in the allowed set)."""
    audit: pd.DataFrame
    """One row per parameter or buffer (a value table: two rows, part 'allowed rows' and 'other
    rows'; everything else part 'all'). Columns: parameter (state-dict name), part, kind ('value
    rows' | 'memory keys/query' | 'memory output' | 'dense' | 'buffer'), numel, changed (elements not
    bit-identical), max_abs_change (float64), bit_identical, allowed (the method may change it),
    violation (changed and not allowed)."""

    @property
    def violations(self) -> pd.DataFrame:
        """The audit rows that changed though the method was not allowed to change them."""
        return self.audit[self.audit["violation"]].reset_index(drop=True)


# --------------------------------------------------------------------------- model diffs


def check_comparable(before: MemoryModel, after: MemoryModel) -> None:
    """Refuse two models of different architectures, memory configs or parameter shapes."""
    if before.config.model_type != after.config.model_type:
        raise AnalysisError(f"cannot diff a {before.config.model_type!r} model against a {after.config.model_type!r} model; "
                        "diff two checkpoints of the same model")
    mb, ma = before.memory_config.to_dict(), after.memory_config.to_dict()
    if mb != ma:
        differ = sorted(k for k in set(mb) | set(ma) if mb.get(k) != ma.get(k))
        raise AnalysisError(f"the two models have different memory configs (they differ in {differ}); "
                        "a diff needs two checkpoints of the same model")
    sb, sa = model_tensors(before), model_tensors(after)
    if set(sb) != set(sa):
        only = sorted(set(sb) ^ set(sa))[:5]
        raise AnalysisError(f"the two models have different parameters (e.g. {only}): different architectures cannot be diffed")
    shapes = [n for n in sb if sb[n].shape != sa[n].shape]
    if shapes:
        raise AnalysisError(f"parameter shapes differ ({shapes[:3]}, e.g. {shapes[0]}: {tuple(sb[shapes[0]].shape)} vs "
                        f"{tuple(sa[shapes[0]].shape)}): different architectures cannot be diffed")


@torch.no_grad()
def diff_models(
    before: MemoryModel,
    after: MemoryModel,
    *,
    allowed: Mapping[int, Sequence[int] | torch.Tensor | np.ndarray] | None = None,
    method: str | None = None,
    lora_targets: Sequence[str] | None = None,
) -> ModelDiff:
    """Compare two checkpoints of one model, bit for bit.

    What the method was allowed to change:
    - `allowed` {memory block: value-row ids} — the rows a sparse method selected (e.g.
      `allowed_rows(run)`); only those value rows, nothing else. Blocks sharing one table pool their rows.
    - `method`, a registered finetuning method (`smviz.train.method_names()`), allows what the registry
      says it trains: `full` every parameter; `lora` the weights of the linear layers named in
      `lora_targets` (default: LoRA's; adapters merged into them, no bias); a value-row method (or None)
      with `allowed`: those rows only; None without `allowed`: nothing (every change is a violation).

    Returns `ModelDiff(slots, audit)`; see its fields for the columns."""
    check_comparable(before, after)
    trains = None if method is None else get_method(method).trains
    if trains == VALUE_ROWS and allowed is None:
        raise AnalysisError(f"method {method!r} trains selected value rows only: pass allowed={{layer: rows}} "
                            "(allowed_rows(run) reads them from a run)")
    layers = before.memory_layers
    n_slots = before.memory_config.n_slots
    allowed_rows = _check_allowed(allowed, layers, n_slots)

    # value tables: state-dict name → (first block, the allowed rows of every block that reads it)
    sb, sa = model_tensors(before), model_tensors(after)
    table_of = {id(p): name for name, p in sb.items()}
    tables: dict[str, tuple[int, torch.Tensor | None]] = {}
    for block, layer in layers.items():
        name = table_of[id(layer.value_table.weight)]
        rows = allowed_rows.get(block) if allowed_rows is not None else None
        if name in tables:
            prev = tables[name][1]
            rows = prev if rows is None else rows if prev is None else torch.cat([prev, rows]).unique()
            tables[name] = (tables[name][0], rows)
        else:
            tables[name] = (block, rows)
    kinds = parameter_kinds(before)
    ok_names = may_change(method, before, lora_targets)

    slot_frames, audit = [], []
    for name, tb in sb.items():
        ta = sa[name].to(tb.device)
        if name in tables:
            block, rows = tables[name]
            everything = name in ok_names  # full finetuning
            row_ok = torch.zeros(n_slots, dtype=torch.bool, device=tb.device)
            if everything:
                row_ok[:] = True
            elif rows is not None:
                row_ok[rows.to(tb.device)] = True
            diff = ta.double() - tb.double()
            row_changed = _changed(tb, ta)  # (N, v_dim) bool
            changed_rows = torch.nonzero(row_changed.any(1)).flatten()
            if len(changed_rows):
                d = torch.linalg.vector_norm(diff[changed_rows], dim=1)
                b = torch.linalg.vector_norm(tb[changed_rows].double(), dim=1)
                a = torch.linalg.vector_norm(ta[changed_rows].double(), dim=1)
                slot_frames.append(pd.DataFrame({
                    "layer": block, "slot": changed_rows.cpu().numpy(), "delta_norm": d.cpu().numpy(),
                    "before_norm": b.cpu().numpy(), "after_norm": a.cpu().numpy(),
                    "relative_change": (d / b).cpu().numpy(), "allowed": row_ok[changed_rows].cpu().numpy(),
                }))
            for part, sel in (("allowed rows", row_ok), ("other rows", ~row_ok)):
                audit.append(_audit_row(name, part, VALUE_ROWS_KIND, diff[sel], row_changed[sel], part == "allowed rows"))
        else:
            audit.append(_audit_row(name, "all", kinds[name], ta.double() - tb.double(), _changed(tb, ta), name in ok_names))
    slots = (pd.concat(slot_frames, ignore_index=True) if slot_frames else pd.DataFrame(columns=SLOT_COLUMNS))
    slots = slots.astype({"layer": "int64", "slot": "int64", "delta_norm": "float64", "before_norm": "float64",
                          "after_norm": "float64", "relative_change": "float64", "allowed": "bool"})
    slots = slots.sort_values(["layer", "delta_norm", "slot"], ascending=[True, False, True], kind="stable").reset_index(drop=True)
    return ModelDiff(slots[SLOT_COLUMNS], pd.DataFrame(audit, columns=AUDIT_COLUMNS))


def allowed_rows(run: Run | str | os.PathLike, step_a: int = 0, step_b: int | None = None) -> dict[int, torch.Tensor]:
    """{memory block: value rows selected in steps step_a+1..step_b} of a sparse run (default: all steps)."""
    run = run if isinstance(run, Run) else Run(run)
    last = _n_steps(run)
    step_b = last if step_b is None else step_b
    _check_steps(run, step_a, step_b, last)
    out = {}
    for layer in run.layers:
        per_step = run.selected(by="step", layer=layer)
        chosen = [np.asarray(v, dtype=np.int64) for s, v in per_step.items() if step_a < int(s) <= step_b]
        out[layer] = torch.from_numpy(np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64))
    return out


def diff_run_steps(
    run: Run | str | os.PathLike,
    base_model_dir: str | os.PathLike,
    step_a: int,
    step_b: int,
    *,
    device: str | torch.device | None = None,
) -> ModelDiff:
    """Diff the memory after step `step_a` against after `step_b` (0 ≤ a < b) of a value-row run (sparse,
    tf-only, kl, ...), both rebuilt from the run's deltas on fresh loads of its base model; allowed =
    rows selected in steps a+1..b. Refuses a base model whose hash is not the run's, and runs without
    deltas (full / LoRA: use `diff_run_model`)."""
    run = run if isinstance(run, Run) else Run(run)
    if get_method(run.method).trains != VALUE_ROWS:
        raise RunError(f"run {run.path} ({run.method}) writes no per-step deltas; diff its final model with diff_run_model")
    last = _n_steps(run)
    _check_steps(run, step_a, step_b, last)
    models = []
    for step in (step_a, step_b):
        model = MemoryModel.from_pretrained(base_model_dir, device=device)
        run.check_model(model)
        models.append(run.rebuild(model, step))
    return diff_models(models[0], models[1], allowed=allowed_rows(run, step_a, step_b), method=run.method)


def diff_run_model(run: Run | str | os.PathLike, base_model_dir: str | os.PathLike, *,
                   device: str | torch.device | None = None) -> ModelDiff:
    """Diff a finished run's final model against its base model, with what the run's method allowed
    (value-row methods: the rows selected in any step; full: everything; lora: the adapted weights)."""
    run = run if isinstance(run, Run) else Run(run)
    if run.summary is None or not run.model_dir.is_dir():
        raise RunError(f"run {run.path} is unfinished (no final model yet); finish it or use diff_run_steps")
    before = MemoryModel.from_pretrained(base_model_dir, device=device)
    return run_diff(run, before, MemoryModel.from_pretrained(run.model_dir, device=device))


def check_run_model(run: Run, before: MemoryModel, after: MemoryModel) -> None:
    """Refuse to audit `after` with `run`'s allowances unless `before` is the run's base model and
    `after` its final model (by hash): another model would be judged by another method's rules."""
    run.check_model(before)
    if run.model_hash is None:
        raise AnalysisError(f"run {run.path} is unfinished, so it has no final model to compare with; finish it first")
    if after.model_hash != run.model_hash:
        raise AnalysisError(f"run {run.path} ended with model {run.model_hash}, but the model compared is {after.model_hash}; "
                            "give the run that wrote this model")


def run_diff(run: Run, before: MemoryModel, after: MemoryModel) -> ModelDiff:
    """`diff_models(before, after)` with what `run`'s method allowed, once `check_run_model` holds."""
    check_run_model(run, before, after)
    if get_method(run.method).trains == VALUE_ROWS:
        return diff_models(before, after, allowed=allowed_rows(run), method=run.method)
    return diff_models(before, after, method=run.method, lora_targets=run.config.get("lora_targets"))


# --------------------------------------------------------------------------- helpers


def _changed(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Elementwise 'not bit-identical' (NaN in both places counts as unchanged)."""
    if not (b.is_floating_point() or b.is_complex()):
        return b != a
    return (b != a) & ~(torch.isnan(b) & torch.isnan(a))


def _audit_row(name: str, part: str, kind: str, diff: torch.Tensor, changed: torch.Tensor, ok: bool) -> dict[str, Any]:
    n_changed = int(changed.sum())
    max_abs = float(diff.abs().nan_to_num(nan=float("inf")).max()) if n_changed else 0.0
    return {"parameter": name, "part": part, "kind": kind, "numel": int(changed.numel()), "changed": n_changed,
            "max_abs_change": max_abs, "bit_identical": n_changed == 0, "allowed": bool(ok),
            "violation": n_changed > 0 and not ok}


def _check_allowed(allowed, layers, n_slots: int) -> dict[int, torch.Tensor] | None:
    if allowed is None:
        return None
    if not isinstance(allowed, Mapping):
        raise AnalysisError("allowed must be a dict {memory block: value-row ids}")
    out = {}
    for block, rows in allowed.items():
        block = resolve_layer(int(block), layers, what="the model")
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long).flatten()
        if len(rows) and (rows.min() < 0 or rows.max() >= n_slots):
            bad = int(rows[(rows < 0) | (rows >= n_slots)][0])
            raise AnalysisError(f"allowed slot id {bad} of block {block} is out of range: the memory has {n_slots} slots (0..{n_slots - 1})")
        out[block] = rows.unique()
    return out


def _n_steps(run: Run) -> int:
    if run.summary is not None:
        return int(run.summary["steps"])
    return int(run.steps["step"].max())


def _check_steps(run: Run, step_a: int, step_b: int, last: int) -> None:
    if not (isinstance(step_a, (int, np.integer)) and isinstance(step_b, (int, np.integer))):
        raise AnalysisError(f"steps must be integers, got {step_a!r} and {step_b!r}")
    if not 0 <= step_a < step_b:
        raise AnalysisError(f"need 0 <= step_a < step_b, got {step_a} and {step_b} (an empty selection of steps)")
    if step_b > last:
        raise AnalysisError(f"run {run.path} has steps 1..{last}; step {step_b} does not exist")
