"""The numbers of `smviz report run`: one or more finetuning runs — learning/forgetting curves
(`Run.metrics`), start/end summary, selected-slot dynamics (set sizes, churn, reuse) and per-fact
training results — as one JSON-able dict; several runs side by side (one learning-vs-forgetting point each)."""

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
        summary = [{"metric": k, **{kk: number(vv) for kk, vv in v.items()}} for k, v in m.items()]
        entry: dict[str, Any] = {
            "label": label, "path": str(run.path), "method": run.method, "steps": s["steps"], "facts": s["facts"],
            "config": run.config,
            "protocol": f"{tag}. Evaluation protocol of the run (summary.json): {s.get('protocol')}",
            "summary": summary,
            "pareto": {"learning_f1_gain": number(m["learning_f1"].get("gain")),
                       "known_f1_relative_drop": number(m["known_f1"].get("relative_drop"))},
            "curves": records(run.metrics),
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
    out["protocol"] = ("Curves: Run.metrics rows (metrics.jsonl) of each run, on shared axes; pareto point per run: "
                       "learning F1 gain (end − start) vs relative drop of known-fact F1, from summary.json; per_fact: "
                       "steps.parquet grouped by fact (final_loss = training loss of the fact's last step).")
    if len(bases) > 1:
        out["warning"] = f"the runs start from different base models ({', '.join(bases)}): compare with care"
    return out
