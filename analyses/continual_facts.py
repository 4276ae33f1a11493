"""The paper's learning-vs-forgetting comparison at small scale, with its ablations (Lin et al. 2025,
§5-6, Figs 3, 5, 6, 7): sparse memory finetuning, full finetuning and LoRA learn a stream of new facts
on the tiny model, over several seeds, each method at the learning rate its own sweep picks; forgetting
is compared at the end and at matched learning.

    make demo DEMO_ARGS=--no-app                  # the workspace: world, tiny model, its slot statistics
    python analyses/continual_facts.py --workspace workspace            # under an hour on 2 CPU cores
    python analyses/continual_facts.py --workspace workspace --quick    # the same study, smaller: ~9 min

Seed s learns its own slice of the world's new facts (facts s·F … s·F+F-1) with batch order seed s,
so seeds differ in data as well as in order. Stages, every one over all seeds:
  1. sweep   sparse (SGD), full (AdamW), LoRA (AdamW) over a learning-rate grid each; each method's
             setting is the rate with the best mean learning exact match (ties: less forgetting)
  2. ablations: AdamW for sparse (its own rate grid); then at sparse's chosen rate and at lr 1000
             (the default, where sparse forgets little): TF-IDF vs tf-only vs random-t vs memory-all;
             t over a grid; background statistics from pretraining vs the stream's own batches (Fig. 7)
Matched learning: forgetting where each run's stream EM (the held-out questions of the whole stream)
first reaches a level, interpolated linearly between evaluations; the headline level is the highest
that every run of the three chosen settings reaches.

Writes into --out (default analyses/results, committed; --quick: analyses/results/quick, ignored by git):
continual_facts.json (every run's end metrics and curve, aggregates, the choices,
the command, model hash and protocol), continual_facts.md (the tables), continual_facts_curves.png
(Fig. 3-style) and continual_facts_pareto.png (Fig. 5-style). Run directories go to --runs (default
WS/continual); an interrupted study resumes where it stopped (finished runs are read back, the
unfinished one resumes from its last evaluation), and a rerun writes the same numbers.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smviz.analysis.continual import CURVE_COLUMNS, at_learning, forgetting_curve, mean_std
from smviz.analysis.runs import Run
from smviz.errors import SmvizError
from smviz.io import write_json_atomic, write_png_atomic, write_text_atomic
from smviz.model import MemoryModel
from smviz.workspace.stages import run_finetune
from smviz.stats import STATS_FILE, SlotStats
from smviz.train import FinetuneConfig

FORMAT = "smviz-continual-facts/1"
NAME = "continual_facts"
MAIN_METHODS = ("sparse", "full", "lora")
METHOD_LABEL = {"sparse": "sparse memory (SGD)", "full": "full finetuning (AdamW)", "lora": "LoRA (AdamW)"}
COLORS = {"sparse": "#1f77b4", "full": "#d62728", "lora": "#ff7f0e", "sparse-adamw": "#17becf", "tf-only": "#9467bd",
          "random-t": "#8c564b", "memory-all": "#2ca02c", "t": "#7fa8d1", "background": "#e377c2"}


@dataclass(frozen=True)
class Plan:
    """How big the study is; everything else is the protocol of FinetuneConfig's defaults."""

    seeds: tuple[int, ...]
    facts: int
    eval_every: int
    lrs: dict[str, tuple[float, ...]]  # sparse (SGD), sparse-adamw, full, lora
    top_t: int
    t_values: tuple[int, ...]
    background_t: tuple[int, ...]
    ablation_lrs: tuple[float, ...]  # sparse SGD rates the row ablations also run at, beside the chosen one


FULL = Plan(seeds=(0, 1, 2), facts=20, eval_every=25,
            lrs={"sparse": (300.0, 1000.0, 3000.0, 10000.0), "sparse-adamw": (0.03, 0.1, 0.3),
                 "full": (2e-5, 5e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3)},
            top_t=500, t_values=(25, 50, 100, 200, 500, 1000), background_t=(25, 500), ablation_lrs=(1000.0,))
QUICK = Plan(seeds=(0, 1), facts=6, eval_every=10,
             lrs={"sparse": (1000.0, 3000.0), "sparse-adamw": (0.1,), "full": (5e-5, 1e-4), "lora": (3e-4, 1e-3)},
             top_t=500, t_values=(50, 500), background_t=(500,), ablation_lrs=(1000.0,))


@dataclass(frozen=True)
class Setting:
    """One configuration of the study, run once per seed."""

    group: str  # sweep, optimizer, selection, t, background
    family: str  # sparse, full, lora, sparse-adamw, tf-only, random-t, memory-all (colour and label)
    method: str
    optimizer: str
    lr: float
    top_t: int
    background: str = "pretraining"

    @property
    def key(self) -> str:
        parts = [self.method, self.optimizer, f"lr{self.lr:g}"]
        if self.method in ("sparse", "tf-only", "random-t"):
            parts.append(f"t{self.top_t}")
        if self.background != "pretraining":
            parts.append(f"bg-{self.background}")
        return "-".join(parts)

    @property
    def label(self) -> str:
        extra = f", t {self.top_t}" if self.method in ("sparse", "tf-only", "random-t") else ""
        bg = ", background: stream" if self.background == "stream" else ""
        return f"{self.method} {self.optimizer} lr {self.lr:g}{extra}{bg}"

    def config(self, plan: Plan, seed: int) -> FinetuneConfig:
        return FinetuneConfig(method=self.method, optimizer=self.optimizer, lr=self.lr, top_t=self.top_t,
                              eval_every=plan.eval_every, seed=seed)


# --------------------------------------------------------------------------- running


class Study:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args, self.plan = args, plan
        self.data = Path(args.workspace) / "data"
        self.model_dir = Path(args.model or Path(args.workspace) / "models" / "tiny")
        self.runs = Path(args.runs or Path(args.workspace) / "continual")
        self.results: dict[str, dict[str, Any]] = {}  # setting key -> {"setting", "seeds": [...]}
        self.v_dim = 0  # width of a value row, set by check()
        self.protocol: dict[str, Any] = {}  # the evaluation protocol, from the first run's summary

    def check(self) -> MemoryModel:
        """Everything the study needs, checked before the first run writes anything."""
        for name in ("facts-new.jsonl", "facts-known.jsonl", "corpus-heldout.jsonl"):
            if not (self.data / name).is_file():
                raise SmvizError(f"{self.data / name} is missing; build the workspace first (make demo DEMO_ARGS=--no-app)")
        if not (self.model_dir / STATS_FILE).is_file():
            raise SmvizError(f"{self.model_dir} has no {STATS_FILE}; compute it with `smviz stats --model {self.model_dir}`")
        model = MemoryModel.from_pretrained(self.model_dir)
        n_new = sum(1 for line in (self.data / "facts-new.jsonl").read_text().splitlines() if line.strip())
        needed = (max(self.plan.seeds) + 1) * self.plan.facts
        if n_new < needed:
            raise SmvizError(f"{len(self.plan.seeds)} seeds of {self.plan.facts} facts need {needed} new facts; the world has {n_new}")
        n_slots = model.memory_config.n_slots
        too_big = [t for t in (self.plan.top_t, *self.plan.t_values, *self.plan.background_t) if t > n_slots]
        if too_big:
            raise SmvizError(f"t values {too_big} exceed the memory's {n_slots} slots; choose smaller --top-t / --t-values")
        self.v_dim = next(iter(model.memory_layers.values())).value_table.weight.shape[1]
        return model

    def run(self, setting: Setting) -> dict[str, Any]:
        """Run (or read back) `setting` for every seed; its entry in self.results."""
        if setting.key in self.results:
            return self.results[setting.key]
        seeds = []
        for seed in self.plan.seeds:
            run_dir = self.runs / setting.key / f"seed-{seed}"
            t0 = time.time()
            summary = run_finetune(
                self.model_dir, run_dir, setting.config(self.plan, seed), stream=self.data / "facts-new.jsonl",
                known=self.data / "facts-known.jsonl", heldout=self.data / "corpus-heldout.jsonl",
                max_facts=self.plan.facts, first_fact=seed * self.plan.facts, background=setting.background,
                known_facts=self.args.known_facts, heldout_rows=self.args.heldout_rows, device=self.args.device,
                progress=False,
            )
            seeds.append(self._seed_result(seed, Path(run_dir), summary))
            self.protocol = self.protocol or summary["protocol"]
            m = summary["metrics"]
            drop = m["known_em"]["relative_drop"]
            print(f"  {setting.key:<36} seed {seed}: learned EM {m['learning_em']['end']:.3f}, "
                  f"known drop {'—' if drop is None else f'{drop:+.1%}'}, NLL {m['heldout_nll']['change']:+.3f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)
        entry = {"setting": {"key": setting.key, "label": setting.label, "group": setting.group, "family": setting.family,
                             "method": setting.method, "optimizer": setting.optimizer, "lr": setting.lr,
                             "top_t": setting.top_t, "background": setting.background},
                 "seeds": seeds}
        entry["aggregate"] = aggregate(seeds)
        self.results[setting.key] = entry
        return entry

    def _seed_result(self, seed: int, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        m = summary["metrics"]
        run = Run(run_dir)
        trainable = summary["trainable_per_step"]
        if trainable is None:  # memory-all trains every row read: the mean over steps of distinct rows read
            trainable = float(run.steps.groupby("step")["accessed"].sum().mean() * self.v_dim)
        curve = forgetting_curve(run.metrics)
        return {
            "seed": seed, "first_fact": seed * self.plan.facts, "model_hash": summary["model_hash"],
            "learn_em_start": m["learning_em"]["start"], "learn_em_end": m["learning_em"]["end"],
            "learn_f1_start": m["learning_f1"]["start"], "learn_f1_end": m["learning_f1"]["end"],
            "known_em_start": m["known_em"]["start"], "known_em_end": m["known_em"]["end"],
            "known_drop": m["known_em"]["relative_drop"], "known_f1_drop": m["known_f1"]["relative_drop"],
            "nll_start": m["heldout_nll"]["start"], "nll_end": m["heldout_nll"]["end"], "nll_change": m["heldout_nll"]["change"],
            "trainable_per_step": trainable,
            "curve": curve[["step", "facts_seen", "stream_em", "stream_f1", "learn_em", "known_em", "known_f1", "heldout_nll",
                            *CURVE_COLUMNS]].to_dict(orient="list"),
        }


SEED_METRICS = ("learn_em_start", "learn_em_end", "learn_f1_start", "learn_f1_end", "known_em_start", "known_em_end",
                "known_drop", "known_f1_drop", "nll_start", "nll_end", "nll_change", "trainable_per_step")


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: mean_std(s[k] for s in seeds) for k in SEED_METRICS}
    out["learn_em_gain"] = mean_std(s["learn_em_end"] - s["learn_em_start"] for s in seeds)
    out["learn_f1_gain"] = mean_std(s["learn_f1_end"] - s["learn_f1_start"] for s in seeds)
    return out


def best(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting with the highest mean learning EM at the end; ties: the smaller known-fact drop."""
    def rank(e: dict[str, Any]) -> tuple[float, float]:
        drop = e["aggregate"]["known_drop"]["mean"]
        return round(e["aggregate"]["learn_em_end"]["mean"], 9), -(drop if drop is not None else 0.0)

    return max(entries, key=rank)


def matched(entries: dict[str, dict[str, Any]], levels: list[float]) -> list[dict[str, Any]]:
    """Per method and learning level: forgetting where each seed's stream EM first reaches the level."""
    rows = []
    for level in levels:
        for method, entry in entries.items():
            points = [at_learning(_curve(s), level) for s in entry["seeds"]]
            reached = [p for p in points if p is not None]
            rows.append({"method": method, "key": entry["setting"]["key"], "level": level, "reached": len(reached),
                         "seeds": len(points), "step": mean_std(p["step"] for p in reached),
                         "known_drop": mean_std(p["known_drop"] for p in reached),
                         "nll_change": mean_std(p["nll_change"] for p in reached)})
    return rows


def _curve(seed_result: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(seed_result["curve"])


def run_study(study: Study) -> dict[str, Any]:
    plan = study.plan
    print(f"1. learning-rate sweep ({len(plan.seeds)} seeds x {plan.facts} facts each)", flush=True)
    sweep: dict[str, list[dict[str, Any]]] = {}
    for method in MAIN_METHODS:
        optimizer = "sgd" if method == "sparse" else "adamw"
        sweep[method] = [study.run(Setting("sweep", method, method, optimizer, lr, plan.top_t)) for lr in plan.lrs[method]]
    chosen = {method: best(entries) for method, entries in sweep.items()}
    sparse_lr = chosen["sparse"]["setting"]["lr"]

    print("2. ablations", flush=True)
    adamw = [study.run(Setting("optimizer", "sparse-adamw", "sparse", "adamw", lr, plan.top_t)) for lr in plan.lrs["sparse-adamw"]]
    by_lr = []
    for lr in dict.fromkeys((sparse_lr, *plan.ablation_lrs)):  # the chosen rate first, then the others
        base = Setting("sweep", "sparse", "sparse", "sgd", lr, plan.top_t)
        selection = [study.run(replace(base, group="selection", family=m, method=m)) for m in ("tf-only", "random-t", "memory-all")]
        t_sweep = [study.run(replace(base, group="t", family="t", top_t=t)) for t in plan.t_values]
        background = [(study.run(replace(base, group="t", family="t", top_t=t)),
                       study.run(replace(base, group="background", family="background", top_t=t, background="stream")))
                      for t in plan.background_t]
        by_lr.append({
            "lr": lr,
            "selection": {"sparse": study.run(base)["setting"]["key"], **{e["setting"]["method"]: e["setting"]["key"] for e in selection}},
            "t": [e["setting"]["key"] for e in t_sweep],
            "background": [{"top_t": p["setting"]["top_t"], "pretraining": p["setting"]["key"], "stream": b["setting"]["key"]}
                           for p, b in background],
        })

    main = {m: chosen[m] for m in MAIN_METHODS}
    reach = min(max(s["curve"]["stream_em"]) for e in main.values() for s in e["seeds"])
    top = max(max(s["curve"]["stream_em"]) for e in main.values() for s in e["seeds"])
    levels = sorted({round(x, 4) for x in np.arange(0.05, top + 1e-9, 0.05)} | ({round(reach, 4)} if reach > 0 else set()))
    return {
        "chosen": {m: e["setting"]["key"] for m, e in chosen.items()},
        "sweep": {m: [e["setting"]["key"] for e in entries] for m, entries in sweep.items()},
        "ablations": {
            "optimizer": {"sgd": chosen["sparse"]["setting"]["key"], "adamw": [e["setting"]["key"] for e in adamw],
                          "adamw_chosen": best(adamw)["setting"]["key"]},
            "by_lr": by_lr,
        },
        "matched": {"level": round(reach, 4) if reach > 0 else None, "levels": matched(main, levels)},
    }


# --------------------------------------------------------------------------- output


def fmt(ms: dict[str, Any], pct: bool = False, digits: int = 3, sign: bool = False) -> str:
    if ms is None or ms["mean"] is None:
        return "—"
    scale, unit = (100.0, " %") if pct else (1.0, "")
    d = 1 if pct else digits
    mean = f"{ms['mean'] * scale:+.{d}f}" if sign else f"{ms['mean'] * scale:.{d}f}"
    std = "" if ms["std"] is None else f" ± {ms['std'] * scale:.{d}f}"
    return f"{mean}{std}{unit}"


def setting_row(e: dict[str, Any], name: str | None = None) -> str:
    a = e["aggregate"]
    trainable = a["trainable_per_step"]["mean"]
    return (f"| {name or e['setting']['label']} | {fmt(a['learn_em_start'])} → {fmt(a['learn_em_end'])} | "
            f"{fmt(a['learn_f1_start'])} → {fmt(a['learn_f1_end'])} | {fmt(a['known_em_start'])} → {fmt(a['known_em_end'])} | "
            f"{fmt(a['known_drop'], pct=True)} | {fmt(a['nll_change'], sign=True)} | {trainable:,.0f} |")


HEADER = ("| setting | learning EM start → end | learning F1 start → end | known EM start → end | known-fact drop | "
          "Δ held-out NLL | trained numbers / step |\n|---|---|---|---|---|---|---|")


def markdown(doc: dict[str, Any]) -> str:
    res, st = doc["results"], doc["study"]
    e = lambda key: res[key]  # noqa: E731
    plan, ft = doc["plan"], doc["finetune_defaults"]
    lines = [
        f"# Continual fact learning: results (`{NAME}.py`)",
        "",
        f"Generated by `{doc['command']}` — model `{doc['model']['hash']}`, {len(plan['seeds'])} seeds × "
        f"{plan['facts']} new facts (seed s: facts s·{plan['facts']} …), {plan['facts'] * ft['steps_per_fact']} steps "
        f"({ft['steps_per_fact']} per fact), each a batch of {ft['batch_size']} rows drawn from the fact's statement "
        f"paraphrases{' and its training-template Q/A lines' if ft['composition'] == 'statements+qa' else ''}; mean ± std over seeds. Learning: exact match / F1 on the held-out question templates "
        f"of the stream's facts; forgetting: relative drop of exact match on {doc['protocol']['known']['n']} known facts' "
        "held-out questions, and change of held-out NLL per token.",
        "",
        "## Main comparison (each method at its sweep's best learning rate)",
        "",
        HEADER,
        *[setting_row(e(st["chosen"][m]), METHOD_LABEL[m] + f", lr {e(st['chosen'][m])['setting']['lr']:g}") for m in MAIN_METHODS],
        "",
    ]
    level = st["matched"]["level"]
    lines += ["## Matched learning", ""]
    if level is None:
        lines += ["A run of the chosen settings learned nothing, so no common learning level exists.", ""]
    else:
        lines += [f"Forgetting where each run's stream EM first reaches **{level:.3f}** (the highest level every run "
                  "of the three reaches), interpolated between evaluations; then at every 0.05 (n = seeds reaching it).", "",
                  "| learning level | " + " | ".join(f"{METHOD_LABEL[m]}: known drop / Δ NLL (n)" for m in MAIN_METHODS) + " |",
                  "|---|" + "---|" * len(MAIN_METHODS)]
        by = {}
        for r in st["matched"]["levels"]:
            by.setdefault(r["level"], {})[r["method"]] = r
        for lv in sorted(by):
            cells = []
            for m in MAIN_METHODS:
                r = by[lv][m]
                cells.append("—" if not r["reached"] else f"{fmt(r['known_drop'], pct=True)} / {fmt(r['nll_change'], sign=True)} ({r['reached']})")
            mark = "**" if lv == level else ""
            lines.append(f"| {mark}{lv:.3f}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Learning-rate sweeps", "", HEADER]
    for m in MAIN_METHODS:
        lines += [setting_row(e(k)) for k in st["sweep"][m]]
    lines += ["", "## Ablations", "", "### Optimizer for sparse", "", HEADER,
              setting_row(e(st["ablations"]["optimizer"]["sgd"])), *[setting_row(e(k)) for k in st["ablations"]["optimizer"]["adamw"]]]
    for ab in st["ablations"]["by_lr"]:
        lines += ["", f"### Which rows train (SGD lr {ab['lr']:g})", "", HEADER,
                  *[setting_row(e(k), f"{name}: {e(k)['setting']['label']}") for name, k in ab["selection"].items()],
                  "", f"### How many rows train (t; SGD lr {ab['lr']:g})", "", HEADER, *[setting_row(e(k)) for k in ab["t"]],
                  "", f"### Background statistics: pretraining data vs the stream's own batches (Fig. 7; SGD lr {ab['lr']:g})", "", HEADER]
        for pair in ab["background"]:
            lines += [setting_row(e(pair["pretraining"]), f"t {pair['top_t']}, background: pretraining"),
                      setting_row(e(pair["stream"]), f"t {pair['top_t']}, background: the stream")]
    lines += ["", "Figures: `continual_facts_curves.png` (Fig. 3-style), `continual_facts_pareto.png` (Fig. 5-style); "
              "numbers: `continual_facts.json`.", ""]
    return "\n".join(lines)


def figures(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, st = doc["results"], doc["study"]

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("stream_em", "learning: stream EM (held-out questions)"), ("known_em", "known-fact EM (forgetting)"),
              ("heldout_nll", "held-out NLL per token")]
    for ax, (col, title) in zip(axes.flat, panels):
        for m in MAIN_METHODS:
            seeds = res[st["chosen"][m]]["seeds"]
            steps = np.array(seeds[0]["curve"]["step"])
            ys = np.array([s["curve"][col] for s in seeds], dtype=float)
            mean = ys.mean(0)
            ax.plot(steps, mean, color=COLORS[m], label=f"{METHOD_LABEL[m]}, lr {res[st['chosen'][m]]['setting']['lr']:g}")
            if len(seeds) > 1:
                sd = ys.std(0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, color=COLORS[m], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    ax = axes[1, 1]
    for m in MAIN_METHODS:
        for i, s in enumerate(res[st["chosen"][m]]["seeds"]):
            ax.plot(s["curve"]["stream_em"], np.array(s["curve"]["known_drop"], dtype=float) * 100, color=COLORS[m], alpha=0.7,
                    marker=".", label=METHOD_LABEL[m] if i == 0 else None)
    if st["matched"]["level"] is not None:
        ax.axvline(st["matched"]["level"], color="grey", ls="--", lw=1, label="matched level")
    ax.set_xlabel("stream EM")
    ax.set_ylabel("known-fact drop (%)")
    ax.set_title("forgetting against learning (each seed)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Learning a stream of new facts — model {doc['model']['hash']}, mean ± std over {len(doc['plan']['seeds'])} seeds")
    fig.tight_layout()
    write_png_atomic(out / f"{NAME}_curves.png", fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    sizes = {k: e["aggregate"]["trainable_per_step"]["mean"] for k, e in res.items()}
    lo, hi = np.log10(min(sizes.values())), np.log10(max(sizes.values()))
    for ax, (col, xlabel, pct) in zip(axes, [("known_drop", "known-fact EM drop (%)", True), ("nll_change", "Δ held-out NLL", False)]):
        for key, e in res.items():
            a = e["aggregate"]
            if a[col]["mean"] is None:  # a base model that knows no known fact has no relative drop
                continue
            x, y = a[col]["mean"] * (100 if pct else 1), a["learn_em_gain"]["mean"]
            xe = (a[col]["std"] or 0) * (100 if pct else 1)
            ye = a["learn_em_gain"]["std"] or 0
            size = 30 + 400 * ((np.log10(sizes[key]) - lo) / (hi - lo) if hi > lo else 0.5)
            family = e["setting"]["family"]
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="none", ecolor=COLORS[family], alpha=0.4, lw=1)
            ax.scatter(x, y, s=size, color=COLORS[family], alpha=0.75, edgecolors="black" if key in st["chosen"].values() else "none")
            ax.annotate(e["setting"]["label"].replace(" pretraining", ""), (x, y), fontsize=6, alpha=0.8,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("learning gain (stream EM, end − start)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f) for f, c in COLORS.items()
               if any(e["setting"]["family"] == f for e in res.values())]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               title="family (marker size: trained numbers per step, log scale)", title_fontsize=8)
    fig.suptitle("Learning vs forgetting, one point per setting (mean ± std over seeds; chosen settings outlined)")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    write_png_atomic(out / f"{NAME}_pareto.png", fig)
    plt.close("all")



def write_outputs(study: Study, plan: Plan, st: dict[str, Any], command: str, model: MemoryModel) -> None:
    out = Path(study.args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = SlotStats.load_for_model(study.model_dir, model)
    protocol = dict(study.protocol)  # every run shares it: the same evaluation sets
    protocol["known"] = {"n": study.args.known_facts, "text": protocol["known"]}
    doc = {
        "format": FORMAT,
        "command": command,
        "model": {"hash": model.model_hash, "memory": model.memory_config.to_dict()},
        "background_statistics": {"unit": stats.unit, "protocol": stats.protocol},
        "plan": {"seeds": list(plan.seeds), "facts": plan.facts, "eval_every": plan.eval_every, "lrs": plan.lrs,
                 "top_t": plan.top_t, "t_values": list(plan.t_values), "background_t": list(plan.background_t),
                 "ablation_lrs": list(plan.ablation_lrs)},
        "finetune_defaults": {k: v for k, v in FinetuneConfig().to_dict().items()
                              if k in ("batch_size", "steps_per_fact", "composition", "lora_rank", "lora_alpha")},
        "protocol": protocol,
        "study": st,
        "results": study.results,
    }
    write_json_atomic(out / f"{NAME}.json", doc)
    write_text_atomic(out / f"{NAME}.md", markdown(doc))
    figures(doc, out)
    print(f"wrote {out / NAME}.json, .md, _curves.png, _pareto.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workspace", default="workspace", help="workspace built by `make demo` (its data/ and models/tiny)")
    p.add_argument("--model", default=None, help="model directory with slot_stats.safetensors (default WS/models/tiny)")
    p.add_argument("--quick", action="store_true", help="2 seeds x 6 facts, short grids (~9 min on 2 CPU cores)")
    p.add_argument("--out", default=None, help="where the results go (default analyses/results; --quick: analyses/results/quick)")
    p.add_argument("--runs", default=None, help="run directories (default WS/continual, or WS/continual-quick with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 2)")
    p.add_argument("--facts", type=int, default=None, help="new facts per seed (default 20, --quick 6)")
    p.add_argument("--top-t", type=int, default=None, help="t of the main sparse setting (default 500)")
    p.add_argument("--t-values", default=None, help="comma-separated t grid of the t ablation")
    p.add_argument("--known-facts", type=int, default=100, help="known facts asked for forgetting (default 100)")
    p.add_argument("--heldout-rows", type=int, default=64, help="held-out corpus rows of 128 tokens for NLL (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (the committed results), cuda, or auto")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.seeds is not None:
        plan = replace(plan, seeds=tuple(range(args.seeds)))
    if args.facts is not None:
        plan = replace(plan, facts=args.facts)
    if args.top_t is not None:
        plan = replace(plan, top_t=args.top_t, background_t=tuple(sorted({min(t, args.top_t) for t in plan.background_t})))
    if args.t_values is not None:
        plan = replace(plan, t_values=tuple(int(t) for t in args.t_values.split(",") if t.strip()))
    if not plan.seeds or plan.facts < 1 or plan.top_t < 1 or not plan.t_values or min(plan.t_values) < 1:
        raise SmvizError("need at least one seed, one fact per seed and t values >= 1")
    return plan


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per LoRA run
    args = parse_args(argv)
    from smviz.device import resolve_device

    args.device = resolve_device(args.device)
    if args.out is None:
        args.out = "analyses/results/quick" if args.quick else "analyses/results"
    if args.runs is None:
        args.runs = str(Path(args.workspace) / ("continual-quick" if args.quick else "continual"))
    command = "python analyses/continual_facts.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        plan = make_plan(args)
        study = Study(args, plan)
        model = study.check()
        t0 = time.time()
        st = run_study(study)
        write_outputs(study, plan, st, command, model)
    except SmvizError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
