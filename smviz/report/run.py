"""The numbers of `smviz report run`: one or more finetuning runs — learning/forgetting curves
(`Run.metrics`), start/end summary (named forgetting probes and editing metrics included), the stream's
items of any kind, selected-slot dynamics (set sizes, churn, reuse) and per-fact training results — as
one JSON-able dict; several runs side by side (one learning-vs-forgetting point each, `pareto_point`)."""

from __future__ import annotations

import os
from typing import Any

from smviz.analysis import Run, churn, slot_reuse
from smviz.errors import InputError, RunError
from smviz.report.common import REPORT_FORMAT, number, records


def _label(run: Run, seen: set[str]) -> str:
    label = run.path.name
    while label in seen:
        label = f"{label}'"
    seen.add(label)
    return label


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.json's metrics as one row per metric: learning_em/f1 (start, end, gain), known_em/f1
    (start, end, relative_drop), heldout_nll (start, end, change, relative_change), forget/NAME/em and
    forget/NAME/f1 per named probe (start, end, relative_drop), editing/METRIC (start, end, change)."""
    rows = []
    for name, value in metrics.items():
        if name == "forget":
            rows += [{"metric": f"forget/{probe}/{m}", **v} for probe, ms in value.items() for m, v in ms.items()]
        elif name == "editing":
            rows += [{"metric": f"editing/{m}", **v} for m, v in value.items()]
        else:
            rows.append({"metric": name, **value})
    return [{k: number(v) for k, v in row.items()} for row in rows]


def pareto_point(metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's learning-vs-forgetting point: learning F1 gain against the relative drop of the known
    facts' F1 — or, with no known facts measured, of the first named probe's F1 (`forgetting_on` says
    which: "known facts", "probe NAME" or None). A coordinate that was not measured is None and the
    point is left out of the figure."""
    known = number(metrics["known_f1"].get("relative_drop"))
    on, drop = ("known facts", known) if metrics["known_f1"].get("start") is not None else (None, None)
    if on is None and metrics.get("forget"):
        name, probe = next(iter(metrics["forget"].items()))
        on, drop = f"probe {name}", number(probe["f1"].get("relative_drop"))
    return {"learning_f1_gain": number(metrics["learning_f1"].get("gain")), "known_f1_relative_drop": known,
            "forgetting_on": on, "forgetting_f1_relative_drop": drop}


def build_run_report(run_dirs: list[str | os.PathLike]) -> dict[str, Any]:
    """Every number of a run report. Refuses missing or unfinished runs before reading anything else."""
    if not run_dirs:
        raise InputError("give at least one run directory")
    runs = [Run(d) for d in run_dirs]
    for run in runs:
        if run.summary is None:
            raise RunError(f"run {run.path} is unfinished (no summary.json); finish it with `smviz finetune` first")
    seen: set[str] = set()
    out: dict[str, Any] = {"format": REPORT_FORMAT, "kind": "run", "runs": []}
    bases = sorted({r.base_model_hash for r in runs})
    out["model_hashes"] = {"base": bases, "runs": {}}
    for run in runs:
        label = _label(run, seen)
        s = run.summary
        out["model_hashes"]["runs"][label] = {"before": run.base_model_hash, "after": run.model_hash}
        tag = f"run {label} ({run.method}): model {run.base_model_hash} → {run.model_hash}"
        m = s["metrics"]
        items = run.item_table()
        entry: dict[str, Any] = {
            "label": label, "path": str(run.path), "method": run.method, "steps": s["steps"], "facts": s["facts"],
            "stream": run.stream, "config": run.config,
            "protocol": f"{tag}. Evaluation protocol of the run (summary.json): {s.get('protocol')}",
            "summary": summary_rows(m),
            "pareto": pareto_point(m),
            "curves": records(run.metrics),
            "items": {"kind": run.stream, "columns": list(items.columns), "rows": records(items)},
        }
        steps = run.steps
        entry["per_fact"] = records(steps.groupby("fact_id", sort=False).agg(
            steps=("step", "nunique"), first_step=("step", "min"), last_step=("step", "max"),
            final_loss=("loss", "last")).reset_index())
        dyn = None
        if any(len(x) for x in steps["selected"]):
            dyn = {}
            for layer in run.layers:
                ch = churn(run, layer)
                reuse = slot_reuse(run, layer)
                dyn[str(layer)] = {
                    "churn": records(ch[["step", "fact_id", "n_selected", "churn", "jaccard", "new_share"]]),
                    "reuse": records(reuse),
                    "ever_selected": int(len(reuse)),
                    "reused_by_several_facts": int((reuse["n_facts"] > 1).sum()),
                }
        entry["dynamics"] = dyn
        entry["dynamics_protocol"] = (f"{tag}. Per memory layer: churn (smviz.analysis.churn) of each step's selected set "
                                      "and slot reuse (smviz.analysis.slot_reuse)" if dyn else
                                      f"{tag}. {run.method} selects no value rows: no selected-slot dynamics")
        out["runs"].append(entry)
    out["protocol"] = ("Curves: Run.metrics rows (metrics.jsonl) of each run, on shared axes, one panel per measured metric "
                       "(named probes by F1); pareto point per run: learning F1 gain (end − start) vs relative drop of "
                       "known-fact F1 (with no known facts: of the first named probe's F1; a run missing either is not "
                       "drawn), from summary.json; items: the stream's items (stream.jsonl); per_fact: steps.parquet "
                       "grouped by stream item (final_loss = training loss of the item's last step).")
    if len(bases) > 1:
        out["warning"] = f"the runs start from different base models ({', '.join(bases)}): compare with care"
    return out
