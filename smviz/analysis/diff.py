"""Checkpoint diffs: what changed between two models (or two steps of a finetuning run) — per value
row, with an audit of every parameter outside the rows the method was allowed to touch — and how
access patterns and answers shifted on a probe set.

- `diff_models(before, after, allowed=..., method=...)` → `ModelDiff(slots, audit)`;
- `diff_run_steps(run, base_model_dir, step_a, step_b)` rebuilds both states from the run's deltas;
- `diff_run_model(run, base_model_dir)`: the base model against the run's final `model/`;
- `access_shift(before, after, probe)`: per token and memory layer, Jaccard of the slot sets read;
- `fact_shift(before, after, facts)`: per question, answer and F1 before vs after.

The audit is how a user catches an optimizer that silently moves frozen rows: every parameter (and
buffer) is compared bit for bit, the value tables split into the allowed rows and all other rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from smviz.analysis.runs import Run, RunError
from smviz.data.facts import Fact
from smviz.errors import SmvizError
from smviz.evaluate import answer_questions
from smviz.model import MemoryModel
from smviz.record import AccessRecorder
from smviz.train.finetune import LORA_TARGETS
from smviz.train.sparse import SELECTIONS

log = logging.getLogger(__name__)

SLOT_COLUMNS = ["layer", "slot", "delta_norm", "before_norm", "after_norm", "relative_change", "allowed"]
AUDIT_COLUMNS = ["parameter", "part", "kind", "numel", "changed", "max_abs_change", "bit_identical", "allowed", "violation"]
SHIFT_COLUMNS = ["doc", "position", "token_id", "layer", "n_before", "n_after", "n_common", "jaccard"]
FACT_SHIFT_COLUMNS = ["fact_id", "question", "gold", "answer_before", "answer_after", "em_before", "em_after",
                      "f1_before", "f1_after", "delta_f1", "answer_changed"]


class DiffError(SmvizError):
    """Two models cannot be compared (different architecture or memory config), or a diff's input is bad."""


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
        raise DiffError(f"cannot diff a {before.config.model_type!r} model against a {after.config.model_type!r} model; "
                        "diff two checkpoints of the same model")
    mb, ma = before.memory_config.to_dict(), after.memory_config.to_dict()
    if mb != ma:
        differ = sorted(k for k in set(mb) | set(ma) if mb.get(k) != ma.get(k))
        raise DiffError(f"the two models have different memory configs (they differ in {differ}); "
                        "a diff needs two checkpoints of the same model")
    sb, sa = _tensors(before), _tensors(after)
    if set(sb) != set(sa):
        only = sorted(set(sb) ^ set(sa))[:5]
        raise DiffError(f"the two models have different parameters (e.g. {only}): different architectures cannot be diffed")
    shapes = [n for n in sb if sb[n].shape != sa[n].shape]
    if shapes:
        raise DiffError(f"parameter shapes differ ({shapes[:3]}, e.g. {shapes[0]}: {tuple(sb[shapes[0]].shape)} vs "
                        f"{tuple(sa[shapes[0]].shape)}): different architectures cannot be diffed")


@torch.no_grad()
def diff_models(
    before: MemoryModel,
    after: MemoryModel,
    *,
    allowed: Mapping[int, Sequence[int] | torch.Tensor | np.ndarray] | None = None,
    method: str | None = None,
    lora_targets: Sequence[str] = LORA_TARGETS,
) -> ModelDiff:
    """Compare two checkpoints of one model, bit for bit.

    What the method was allowed to change:
    - `allowed` {memory block: value-row ids} — the rows a sparse method selected (e.g.
      `allowed_rows(run)`); only those value rows, nothing else. Blocks sharing one table pool their rows.
    - `method="full"`: every parameter; `method="lora"`: the weights of the linear layers named in
      `lora_targets` (LoRA merged into them; adapters have no bias); a sparse method name (or None)
      with `allowed`: those rows only; None without `allowed`: nothing (every change is a violation).

    Returns `ModelDiff(slots, audit)`; see its fields for the columns."""
    check_comparable(before, after)
    if method is not None and method not in SELECTIONS + ("full", "lora"):
        raise DiffError(f"unknown method {method!r}; choose one of {', '.join(SELECTIONS + ('full', 'lora'))}")
    if method in SELECTIONS and allowed is None:
        raise DiffError(f"method {method!r} trains selected value rows only: pass allowed={{layer: rows}} "
                        "(allowed_rows(run) reads them from a run)")
    layers = before.memory_layers
    n_slots = before.memory_config.n_slots
    allowed_rows = _check_allowed(allowed, layers, n_slots)

    # value tables: state-dict name → (first block, the allowed rows of every block that reads it)
    sb, sa = _tensors(before), _tensors(after)
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
    kinds = _kinds(before, sb)
    lora_names = _lora_weights(before, lora_targets) if method == "lora" else set()

    slot_frames, audit = [], []
    for name, tb in sb.items():
        ta = sa[name].to(tb.device)
        if name in tables:
            block, rows = tables[name]
            everything = method == "full"
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
                audit.append(_audit_row(name, part, "value rows", diff[sel], row_changed[sel], part == "allowed rows"))
        else:
            kind = kinds.get(name, "dense")
            ok = method == "full" or name in lora_names
            audit.append(_audit_row(name, "all", kind, ta.double() - tb.double(), _changed(tb, ta), ok))
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
    """Diff the memory after step `step_a` against after `step_b` (0 ≤ a < b) of a sparse run, both
    rebuilt from the run's deltas on fresh loads of its base model; allowed = rows selected in steps
    a+1..b. Refuses a base model whose hash is not the run's, and runs without deltas (full / LoRA:
    use `diff_run_model`)."""
    run = run if isinstance(run, Run) else Run(run)
    if run.method not in SELECTIONS:
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
    """Diff a finished run's final model (`<run>/model`) against its base model, with what the run's
    method allowed (sparse: the rows selected in any step; full: everything; lora: the adapted weights)."""
    run = run if isinstance(run, Run) else Run(run)
    if run.summary is None or not (run.path / "model").is_dir():
        raise RunError(f"run {run.path} is unfinished (no model/ yet); finish it or use diff_run_steps")
    before = MemoryModel.from_pretrained(base_model_dir, device=device)
    run.check_model(before)
    after = MemoryModel.from_pretrained(run.path / "model", device=device)
    if run.method in SELECTIONS:
        return diff_models(before, after, allowed=allowed_rows(run), method=run.method)
    targets = run.config.get("lora_targets", LORA_TARGETS)
    return diff_models(before, after, method=run.method, lora_targets=targets)


# --------------------------------------------------------------------------- access and answer shifts


def access_shift(
    before: MemoryModel,
    after: MemoryModel,
    probe: Sequence[str] | Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Per probe token and memory layer: the set of slots read (union over heads of each head's top-k)
    by `before` and by `after`, and their Jaccard similarity |A∩B| / |A∪B| (1 = same slots).

    `probe`: texts (tokenised with `before`'s tokenizer, each its own document, no special tokens
    added), a batch dict with `input_ids` (and `attention_mask`; padding is skipped), or an input-ids
    tensor (B, T). Columns: doc (probe number), position, token_id, layer, n_before, n_after, n_common,
    jaccard."""
    check_comparable(before, after)
    batch = _probe_batch(before, probe)
    sets = []
    for model in (before, after):
        with torch.no_grad(), AccessRecorder(model, layers) as rec:
            model(**{k: v.to(model.device) for k, v in batch.items()})
        sets.append(rec.batches[0])
    b, a = sets
    frames = []
    for li, layer in enumerate(b.layers):
        sb = b.slots[:, li].reshape(len(b.slots), -1).astype(np.int64)
        sa = a.slots[:, li].reshape(len(a.slots), -1).astype(np.int64)
        n_b, n_a, common = _set_sizes(sb, sa)
        union = n_b + n_a - common
        frames.append(pd.DataFrame({
            "doc": b.seq.astype(np.int64), "position": b.position.astype(np.int64), "token_id": b.token_id.astype(np.int64),
            "layer": layer, "n_before": n_b, "n_after": n_a, "n_common": common, "jaccard": common / union,
        }))
    return pd.concat(frames, ignore_index=True)[SHIFT_COLUMNS]


def fact_shift(before: MemoryModel, after: MemoryModel, facts: Sequence[Fact], *, heldout: bool = True,
               max_new_tokens: int = 12) -> pd.DataFrame:
    """Per question of `facts` (held-out templates; training ones with heldout=False): the greedy
    answer and its EM / token F1 under `before` and `after` (`smviz.evaluate.answer_questions`).
    Columns: fact_id, question, gold, answer_before, answer_after, em_before, em_after, f1_before,
    f1_after, delta_f1 (after − before), answer_changed."""
    facts = list(facts)
    if not facts:
        raise DiffError("no facts given: pass at least one Fact")
    rb = answer_questions(before, facts, heldout=heldout, max_new_tokens=max_new_tokens)
    ra = answer_questions(after, facts, heldout=heldout, max_new_tokens=max_new_tokens)
    rows = [{
        "fact_id": x["fact_id"], "question": x["question"], "gold": x["gold"],
        "answer_before": x["prediction"], "answer_after": y["prediction"], "em_before": x["em"], "em_after": y["em"],
        "f1_before": x["f1"], "f1_after": y["f1"], "delta_f1": y["f1"] - x["f1"],
        "answer_changed": x["prediction"] != y["prediction"],
    } for x, y in zip(rb, ra)]
    return pd.DataFrame(rows, columns=FACT_SHIFT_COLUMNS)


# --------------------------------------------------------------------------- helpers


def _tensors(model: MemoryModel) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the LM, each shared/tied tensor once (first name)."""
    out = dict(model.lm.named_parameters())
    out.update({n: b for n, b in model.lm.named_buffers() if not n.endswith("inv_freq")})  # rotary tables are derived
    return out


def _kinds(model: MemoryModel, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    ids: dict[int, str] = {}
    for m in model.memory_layers.values():
        for p in (m.keys, *m.query.parameters(), *m.query_norm.parameters(), *m.query_norm.buffers()):
            ids[id(p)] = "memory keys/query"
        if m.query_gain is not None:
            ids[id(m.query_gain)] = "memory keys/query"
        for lin in (m.w1, m.w2):
            if lin is not None:
                for p in lin.parameters():
                    ids[id(p)] = "memory output"
    params = {id(p) for p in model.lm.parameters()}
    return {n: ids.get(id(t), "dense" if id(t) in params else "buffer") for n, t in tensors.items()}


def _lora_weights(model: MemoryModel, targets: Sequence[str]) -> set[str]:
    wanted = set(targets)
    return {f"{name}.weight" for name, m in model.lm.named_modules()
            if name.rsplit(".", 1)[-1] in wanted and isinstance(m, torch.nn.Linear)}


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
        raise DiffError("allowed must be a dict {memory block: value-row ids}")
    out = {}
    for block, rows in allowed.items():
        if int(block) not in layers:
            raise DiffError(f"allowed names block {block}, which has no memory layer (memory layers: {list(layers)})")
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long).flatten()
        if len(rows) and (rows.min() < 0 or rows.max() >= n_slots):
            bad = int(rows[(rows < 0) | (rows >= n_slots)][0])
            raise DiffError(f"allowed slot id {bad} of block {block} is out of range: the memory has {n_slots} slots (0..{n_slots - 1})")
        out[int(block)] = rows.unique()
    return out


def _n_steps(run: Run) -> int:
    if run.summary is not None:
        return int(run.summary["steps"])
    return int(run.steps["step"].max())


def _check_steps(run: Run, step_a: int, step_b: int, last: int) -> None:
    if not (isinstance(step_a, (int, np.integer)) and isinstance(step_b, (int, np.integer))):
        raise DiffError(f"steps must be integers, got {step_a!r} and {step_b!r}")
    if not 0 <= step_a < step_b:
        raise DiffError(f"need 0 <= step_a < step_b, got {step_a} and {step_b} (an empty selection of steps)")
    if step_b > last:
        raise DiffError(f"run {run.path} has steps 1..{last}; step {step_b} does not exist")


def _probe_batch(model: MemoryModel, probe) -> dict[str, torch.Tensor]:
    if isinstance(probe, torch.Tensor):
        probe = {"input_ids": probe}
    if isinstance(probe, Mapping):
        if "input_ids" not in probe:
            raise DiffError("a probe batch needs 'input_ids'")
        ids = torch.as_tensor(probe["input_ids"])
        if ids.dim() != 2 or ids.numel() == 0:
            raise DiffError(f"input_ids must be a non-empty (batch, tokens) tensor, got shape {tuple(ids.shape)}")
        mask = probe.get("attention_mask")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else torch.as_tensor(mask)}
    texts = list(probe)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise DiffError("probe texts must be a non-empty list of non-empty strings")
    if model.tokenizer is None:
        raise DiffError("the model has no tokenizer: pass the probe as input_ids")
    encoded = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):  # right-padded; padding is masked out and never recorded
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _set_sizes(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of two (n, m) id arrays: distinct ids in a, in b, and in both."""
    n_a, n_b, common = (np.zeros(len(a), np.int64) for _ in range(3))
    for lo in range(0, len(a), chunk):
        x, y = np.sort(a[lo : lo + chunk], 1), np.sort(b[lo : lo + chunk], 1)
        first_x = np.ones_like(x, dtype=bool)
        first_x[:, 1:] = x[:, 1:] != x[:, :-1]
        first_y = np.ones_like(y, dtype=bool)
        first_y[:, 1:] = y[:, 1:] != y[:, :-1]
        n_a[lo : lo + chunk] = first_x.sum(1)
        n_b[lo : lo + chunk] = first_y.sum(1)
        in_y = (x[:, :, None] == y[:, None, :]).any(2)
        common[lo : lo + chunk] = (first_x & in_y).sum(1)
    return n_a, n_b, common
