"""The headline under a reviewer's controls (issue 17): sparse memory finetuning against full finetuning
and LoRA on the tiny model, with learning rates chosen on separate selection seeds, every baseline
tuned over a grid of its own, intervals over seeds and questions, paired tests, and the controls a
reviewer asks for.

    make demo DEMO_ARGS=--no-app                          # the workspace: world, tiny model, slot statistics
    python analyses/headline_controls.py --workspace workspace --jobs 2   # the study (resumable), 2 runs at once
    python analyses/headline_controls.py --workspace workspace --quick    # the same study, small

Seeds: seed s learns the new facts s·F … s·F+F−1 in batch order s, so seeds differ in their facts.
Settings are chosen on the selection seeds, and everything reported is measured on the report seeds.
No selection seed is a report seed, and no fact is shared between them.

Stages:
  1. selection: every family's grid on the selection seeds. Families:
     - sparse: TF-IDF against the pretraining background, SGD, its lr grid;
     - full finetuning (AdamW), its lr grid, three ways: as is, with the value tables at the model's
       own value_lr_mult (10, as pretraining trained them), and with the memory frozen;
     - LoRA (AdamW): ranks × alpha ∈ {rank, 2·rank} × lr grid, on the attention and FFN projections,
       and the same with the memory's projections (query, w1, w2) adapted too.
     Each family picks the setting whose selection seeds reach the plan's target learning level with
     the least known-fact forgetting there, else the one that learns most. The same rule applies to
     every family. The Pareto front of each family over its whole grid is reported as well.
     - the dense twin (C5′): full finetuning over its lr grid and LoRA over its grid (attention + FFN),
       on a dense model pretrained with the memory model's own recipe, but with no memory and every
       FFN widened until a token uses as many parameters as in the memory model
       (`smviz.train.recipes.dense_twin`; WS/models/NAME-dense, pretrained first, resumably).
  2. backgrounds (C1): slot statistics of the model over corpus text only, and over the pretraining
     mixture without the known people's documents. Same batch count, batch size and length as the
     model's own statistics.
  3. report: on the report seeds, each family's chosen setting (the dense twin's included), plus:
     - sparse at every rate of its grid under each of the three backgrounds (C1);
     - sparse, full and LoRA on statements only, the paper's setting (C7);
     - the selection rules kl, grad-norm and random-t at sparse's chosen rate.
Analysis:
- forgetting at matched learning (the highest level every chosen setting reaches on every report
  seed), with two-level bootstrap intervals over seeds and questions;
- paired differences and sign-flip tests of sparse against each baseline (against the dense twin, per
  seed: the same facts learned, but each model's drop relative to its own start);
- forgetting at equal steps (C2);
- the mean forgetting over learning levels up to the matched one: the area under the
  learning–forgetting curve, per unit of learning;
- the share of TF-IDF picks scored 0, i.e. ties broken by slot id (C10).

Writes into --out (default analyses/results; --quick: analyses/results/quick, ignored by git):
headline_controls.json (every run's curve and per-question known-fact scores at the matched level,
the choices, the command, model hash and protocol), headline_controls.md (the tables),
headline_controls_steps.png (C2) and headline_controls_pareto.png (each family's front). Run
directories go to --runs (default WS/controls). An interrupted study resumes where it stopped, and a
rerun writes the same numbers.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import shlex
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from smviz.analysis.continual import at_learning, crossing, forgetting_curve
from smviz.analysis.intervals import (Interval, drop_difference, drop_difference_test, drop_interval, mean_interval,
                                     sign_flip_test)
from smviz.analysis.runs import Run
from smviz.errors import SmvizError
from smviz.io import write_json_atomic, write_png_atomic, write_text_atomic
from smviz.model import MemoryModel
from smviz.stats import STATS_FILE, SlotStats
from smviz.train import FinetuneConfig
from smviz.train.lora import DEFAULT_TARGETS, MEMORY_TARGETS
from smviz.train.recipes import dense_twin
from smviz.train.rundir import FinetuneRunDir
from smviz.workspace import Workspace
from smviz.workspace.stages import background_stats, pretrain_config_of, run_finetune, run_pretraining

FORMAT = "smviz-headline-controls/1"
NAME = "headline_controls"
MAIN = ("sparse", "full", "full-values", "full-frozen-memory", "lora", "lora-memory")
DENSE = ("dense-full", "dense-lora")  # on the dense twin (C5′)
LABEL = {
    "sparse": "sparse memory (TF-IDF, SGD)", "full": "full finetuning (AdamW)",
    "full-values": "full, value tables at their own rate", "full-frozen-memory": "full, memory frozen",
    "lora": "LoRA (attention + FFN)", "lora-memory": "LoRA (+ memory projections)",
    "kl": "sparse, KL rule", "grad-norm": "sparse, gradient-norm top-t", "random-t": "sparse, random t",
    "sparse-tf-ties": "sparse, TF-IDF ties broken by TF",
    "dense-full": "dense twin, full finetuning (AdamW)", "dense-lora": "dense twin, LoRA (attention + FFN)",
}
COLORS = {"sparse": "#1f77b4", "full": "#d62728", "full-values": "#e377c2", "full-frozen-memory": "#8c564b",
          "lora": "#ff7f0e", "lora-memory": "#bcbd22", "kl": "#17becf", "grad-norm": "#9467bd", "random-t": "#7f7f7f",
          "sparse-tf-ties": "#aec7e8", "dense-full": "#2ca02c", "dense-lora": "#98df8a"}
BACKGROUND_MIXTURES = ("corpus", "no-known")


@dataclass(frozen=True)
class Plan:
    facts: int
    selection_seeds: tuple[int, ...]
    report_seeds: tuple[int, ...]
    eval_every: int
    top_t: int
    target: float  # the learning level settings are chosen at (stream EM on the selection seeds)
    sparse_lrs: tuple[float, ...]
    full_lrs: tuple[float, ...]
    lora_lrs: tuple[float, ...]
    lora_ranks: tuple[int, ...]
    lora_alpha_mults: tuple[int, ...] = (1, 2)
    rules: tuple[str, ...] = ("kl", "grad-norm", "random-t", "sparse-tf-ties")
    steps_per_fact: int = 10  # FinetuneConfig's defaults: the paper's ~10 steps of one fact's paraphrases
    batch_size: int = 16


FULL = Plan(facts=14, selection_seeds=(5, 6), report_seeds=(0, 1, 2, 3, 4), eval_every=14, top_t=500, target=0.15,
            sparse_lrs=(1000.0, 3000.0, 10000.0), full_lrs=(2e-5, 5e-5, 1e-4), lora_lrs=(1e-4, 3e-4, 1e-3),
            lora_ranks=(8, 32, 128))
QUICK = Plan(facts=4, selection_seeds=(2,), report_seeds=(0, 1), eval_every=4, top_t=500, target=0.05,
             sparse_lrs=(1000.0,), full_lrs=(1e-4,), lora_lrs=(1e-3,), lora_ranks=(8,), lora_alpha_mults=(2,))


@dataclass(frozen=True)
class Setting:
    """One configuration, run once per seed. `options` are further FinetuneConfig fields."""

    family: str
    method: str
    optimizer: str
    lr: float
    options: tuple[tuple[str, Any], ...] = ()
    background: str = "pretraining"  # pretraining, or a BACKGROUND_MIXTURES name
    composition: str = "statements+qa"
    model: str = "memory"  # memory: the study's model; dense: its dense twin (the family's name says so)

    @property
    def key(self) -> str:
        parts = [self.family, self.optimizer, f"lr{self.lr:g}"]
        for name, value in self.options:
            if name == "lora_targets":
                continue  # the family says which
            parts.append(f"{name.replace('_', '')}{value:g}" if isinstance(value, float) else f"{name.replace('_', '')}{value}")
        if self.background != "pretraining":
            parts.append(f"bg-{self.background}")
        if self.composition != "statements+qa":
            parts.append(self.composition)
        return "-".join(parts)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.options if k != "lora_targets")
        bg = f", background {self.background}" if self.background != "pretraining" else ""
        comp = ", statements only" if self.composition != "statements+qa" else ""
        return f"{LABEL.get(self.family, self.family)}, lr {self.lr:g}{', ' + extra if extra else ''}{bg}{comp}"

    def config(self, plan: Plan, seed: int) -> FinetuneConfig:
        return FinetuneConfig(method=self.method, optimizer=self.optimizer, lr=self.lr, top_t=plan.top_t,
                              eval_every=plan.eval_every, seed=seed, composition=self.composition,
                              steps_per_fact=plan.steps_per_fact, batch_size=plan.batch_size, **dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "family": self.family, "method": self.method,
                "optimizer": self.optimizer, "lr": self.lr, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options},
                "background": self.background, "composition": self.composition, "model": self.model}


def selection_grid(plan: Plan, value_lr_mult: float) -> dict[str, list[Setting]]:
    """Every family's grid (stage 1)."""
    grid: dict[str, list[Setting]] = {
        "sparse": [Setting("sparse", "sparse", "sgd", lr) for lr in plan.sparse_lrs],
        "full": [Setting("full", "full", "adamw", lr) for lr in plan.full_lrs],
        "full-values": [Setting("full-values", "full", "adamw", lr, (("value_lr_mult", float(value_lr_mult)),)) for lr in plan.full_lrs],
        "full-frozen-memory": [Setting("full-frozen-memory", "full", "adamw", lr, (("freeze_memory", True),)) for lr in plan.full_lrs],
    }
    for family, targets, model in (("lora", DEFAULT_TARGETS, "memory"), ("lora-memory", DEFAULT_TARGETS + MEMORY_TARGETS, "memory"),
                                   ("dense-lora", DEFAULT_TARGETS, "dense")):
        grid[family] = [Setting(family, "lora", "adamw", lr, (("lora_rank", rank), ("lora_alpha", float(mult * rank)),
                                                              ("lora_targets", targets)), model=model)
                        for rank in plan.lora_ranks for mult in plan.lora_alpha_mults for lr in plan.lora_lrs]
    grid["dense-full"] = [Setting("dense-full", "full", "adamw", lr, model="dense") for lr in plan.full_lrs]
    return grid


# --------------------------------------------------------------------------- running


@dataclass
class SeedRun:
    """What the analysis needs of one run: its curve, and per evaluation its known-fact question scores."""

    seed: int
    curve: pd.DataFrame
    known: np.ndarray  # (evaluations, questions) EM, rows in curve order
    question_ids: list[str]
    zero_score_share: list[float] | None  # per step, TF-IDF picks scored 0 (sparse only)
    summary: dict[str, Any] = field(repr=False, default_factory=dict)


class Study:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args, self.plan = args, plan
        self.ws = Workspace(args.workspace)
        self.data = self.ws.data
        self.model_dir = Path(args.model or self.ws.model("tiny"))
        self.dense_name = f"{self.model_dir.name}-dense"
        self.dense_dir = self.ws.model(self.dense_name)
        self.runs = Path(args.runs or self.ws.root / "controls")
        self.results: dict[str, dict[str, Any]] = {}
        self.loaded: dict[tuple[str, int], SeedRun] = {}
        self.protocol: dict[str, Any] = {}

    def check(self) -> MemoryModel:
        """Everything the study needs, checked before the first run writes anything."""
        for name in ("facts-new.jsonl", "facts-known.jsonl", "corpus-heldout.jsonl"):
            if not (self.data / name).is_file():
                raise SmvizError(f"{self.data / name} is missing; build the workspace first (make demo DEMO_ARGS=--no-app)")
        if not (self.model_dir / STATS_FILE).is_file():
            raise SmvizError(f"{self.model_dir} has no {STATS_FILE}; compute it with `smviz stats --model {self.model_dir}`")
        model = MemoryModel.from_pretrained(self.model_dir)
        n_new = sum(1 for line in (self.data / "facts-new.jsonl").read_text().splitlines() if line.strip())
        seeds = (*self.plan.selection_seeds, *self.plan.report_seeds)
        if set(self.plan.selection_seeds) & set(self.plan.report_seeds):
            raise SmvizError("selection seeds and report seeds must differ")
        needed = (max(seeds) + 1) * self.plan.facts
        if n_new < needed:
            raise SmvizError(f"seeds up to {max(seeds)} of {self.plan.facts} facts each need {needed} new facts; the world has {n_new}")
        if self.plan.top_t > model.memory_config.n_slots:
            raise SmvizError(f"top_t {self.plan.top_t} exceeds the memory's {model.memory_config.n_slots} slots")
        self.dense_config()
        return model

    def dense_config(self):
        """The dense twin's pretraining config: the model's own (WS/pretrain/NAME) made dense."""
        own = pretrain_config_of(self.ws, self.model_dir.name)
        if own is None:
            raise SmvizError(f"the dense twin is pretrained with the model's own recipe, and {self.ws.pretrain_run(self.model_dir.name)} "
                             "holds none: study a model pretrained in this workspace (make demo)")
        tokenizer = MemoryModel.from_pretrained(self.model_dir).require_tokenizer("the dense twin")
        return dense_twin(own, len(tokenizer))

    def pretrain_dense_twin(self) -> dict[str, Any]:
        """Stage 0: the dense twin, pretrained (or resumed, or read back) in the workspace."""
        config = self.dense_config()
        t0 = time.time()
        model = run_pretraining(self.ws, self.dense_name, config, device=self.args.device, progress=False)
        params = sum(p.numel() for p in model.parameters())
        print(f"  dense twin {self.dense_dir}: FFN width {config.model['intermediate_size']}, {params:,} parameters "
              f"(model {model.model_hash}; {time.time() - t0:.0f} s)", flush=True)
        return {"model_dir": str(self.dense_dir), "hash": model.model_hash, "parameters": params,
                "config": config.to_dict()}

    def background_file(self, mixture: str) -> Path:
        return self.runs / "backgrounds" / f"{mixture}.safetensors"

    def backgrounds(self) -> dict[str, dict[str, Any]]:
        """Stage 2: the control backgrounds, counted like the model's own statistics (same batches,
        batch size and length), each once."""
        own = SlotStats.load_for_model(self.model_dir).protocol
        out = {}
        for mixture in BACKGROUND_MIXTURES:
            path = self.background_file(mixture)
            if path.is_file():
                stats = SlotStats.load(path)
            else:
                t0 = time.time()
                stats = background_stats(self.ws, self.model_dir, n_batches=own.get("n_batches", 1000),
                                         batch_size=own.get("batch_size"), seq_len=own.get("seq_len"), out=path,
                                         device=self.args.device, progress=False, mixture=mixture)
                print(f"  background {mixture}: {stats.n_docs} batches ({time.time() - t0:.0f} s)", flush=True)
            out[mixture] = {"path": str(path), "protocol": stats.protocol, "n_docs": stats.n_docs}
        return out

    def run(self, setting: Setting, seeds: tuple[int, ...]) -> dict[str, Any]:
        """Run (or read back) `setting` for `seeds`; its entry in self.results."""
        entry = self.results.setdefault(setting.key, {"setting": setting.to_dict(), "seeds": {}})
        for seed in seeds:
            if seed in entry["seeds"]:
                continue
            run_dir = self.runs / setting.key / f"seed-{seed}"
            t0 = time.time()
            background = "pretraining" if setting.background == "pretraining" else str(self.background_file(setting.background))
            summary = run_finetune(
                self.dense_dir if setting.model == "dense" else self.model_dir, run_dir, setting.config(self.plan, seed), stream=self.data / "facts-new.jsonl",
                known=self.data / "facts-known.jsonl", heldout=self.data / "corpus-heldout.jsonl",
                max_facts=self.plan.facts, first_fact=seed * self.plan.facts, background=background,
                known_facts=self.args.known_facts, heldout_rows=self.args.heldout_rows, device=self.args.device,
                progress=False,
            )
            self.protocol = self.protocol or summary["protocol"]
            loaded = load_seed(run_dir, seed, summary)
            self.loaded[(setting.key, seed)] = loaded
            m = summary["metrics"]
            entry["seeds"][seed] = {
                "learn_em_end": m["learning_em"]["end"], "stream_em_end": float(loaded.curve["stream_em"].iloc[-1]),
                "known_drop_end": m["known_em"]["relative_drop"], "nll_change_end": m["heldout_nll"]["change"],
                "model_hash": summary["model_hash"],
                "curve": loaded.curve[["step", "stream_em", "known_em", "known_drop", "heldout_nll", "nll_change"]].to_dict(orient="list"),
                "zero_score_share": None if loaded.zero_score_share is None else float(np.mean(loaded.zero_score_share)),
            }
            drop = m["known_em"]["relative_drop"]
            print(f"  {setting.key:<52} seed {seed}: stream EM {entry['seeds'][seed]['stream_em_end']:.3f}, known drop "
                  f"{'—' if drop is None else f'{drop:+.1%}'} ({time.time() - t0:.0f} s)", flush=True)
        return entry

    def prefetch(self, settings: list[Setting], seeds: tuple[int, ...]) -> None:
        """With --jobs N > 1: every run of `settings` × `seeds` not finished yet, in N processes of one torch
        thread each (on 2 CPU cores two small runs side by side finish sooner than one run on two threads);
        the sequential pass after it reads them back. Full finetuning runs, the longest, go first."""
        if self.args.jobs <= 1:
            return
        unique = {s.key: s for s in settings}.values()
        todo = [(s, seed) for s in sorted(unique, key=lambda s: s.method != "full") for seed in seeds
                if FinetuneRunDir(self.runs / s.key / f"seed-{seed}").summary() is None]
        if not todo:
            return
        print(f"  {len(todo)} runs in {self.args.jobs} processes", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.args.jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for done in [pool.submit(_run_one, vars(self.args), self.plan, s, seed) for s, seed in todo]:
                done.result()  # a failed run stops the study, as it would in one process

    def seed_runs(self, setting: Setting, seeds: tuple[int, ...]) -> list[SeedRun]:
        self.run(setting, seeds)
        return [self.loaded[(setting.key, s)] for s in seeds]


def _run_one(args: dict[str, Any], plan: Plan, setting: Setting, seed: int) -> None:
    """One run in a worker process of `Study.prefetch`."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    Study(argparse.Namespace(**args), plan).run(setting, (seed,))


def load_seed(run_dir: Path, seed: int, summary: dict[str, Any]) -> SeedRun:
    run = Run(run_dir)
    curve = forgetting_curve(run.metrics)
    q = run.questions
    known = q[q["set"] == "known"].pivot(index="step", columns="id", values="em")
    ids = list(q[(q["set"] == "known") & (q["step"] == 0)]["id"])  # the protocol's order
    matrix = known.loc[curve["step"], ids].to_numpy(dtype=float)
    zero = None
    if run.method == "sparse":  # TF-IDF picks scored exactly 0 (df = |B|): the rest of top-t is filled by slot id
        steps = run.steps
        zero = [float(np.mean(np.asarray(score) == 0)) if len(score) else 0.0 for score in steps["score"]]
    return SeedRun(seed, curve, matrix, ids, zero, summary)


# --------------------------------------------------------------------------- analysis


def at_level(runs: list[SeedRun], level: float) -> dict[str, Any] | None:
    """Per-question known-fact scores where each run first reaches `level` (interpolated as
    `at_learning` interpolates the means), or None if some run never does."""
    rows, steps, nll = [], [], []
    for r in runs:
        found = crossing(r.curve["stream_em"].to_numpy(dtype=float), level)
        if found is None:
            return None
        lo, hi, frac = found
        rows.append((1 - frac) * r.known[lo] + frac * r.known[hi])
        point = at_learning(r.curve, level)
        steps.append(point["step"])
        nll.append(point["nll_change"])
    return {"end": np.stack(rows), "step": steps, "nll_change": nll}


def start_scores(runs: list[SeedRun]) -> np.ndarray:
    start = runs[0].known[0]
    for r in runs:
        if not np.array_equal(r.known[0], start) or r.question_ids != runs[0].question_ids:
            raise SmvizError("runs of one comparison must start from the same model and ask the same known-fact questions")
    return start


def drop_or_none(start: np.ndarray, end: np.ndarray, seed: int) -> dict[str, Any] | None:
    """`drop_interval` as a dict, None when the model knew none of the questions (no relative drop)."""
    return None if start.mean() == 0 else drop_interval(start, end, seed=seed).to_dict()


def forgetting_at(runs: list[SeedRun], level: float, seed: int) -> dict[str, Any] | None:
    point = at_level(runs, level)
    if point is None:
        return None
    start = start_scores(runs)
    return {"known_drop": drop_or_none(start, point["end"], seed),
            "nll_change": mean_interval(point["nll_change"], seed=seed).to_dict(),
            "step": float(np.mean(point["step"])), "seeds": len(runs), "questions": len(start)}


def area_under(runs: list[SeedRun], level: float, seed: int, points: int = 20) -> dict[str, Any] | None:
    """Mean known-fact drop over the learning levels level/points … level (first reach of each), per
    seed, with its interval over seeds: the area under the learning–forgetting curve per unit of learning."""
    if start_scores(runs).mean() == 0:
        return None
    levels = np.linspace(0, level, points + 1)[1:]
    per_seed = [float(np.mean([at_learning(r.curve, lv)["known_drop"] for lv in levels])) for r in runs]
    return mean_interval(per_seed, seed=seed).to_dict()


def equal_steps(runs: list[SeedRun], seed: int) -> list[dict[str, Any]]:
    start = start_scores(runs)
    steps = runs[0].curve["step"].tolist()
    out = []
    for i, step in enumerate(steps):
        end = np.stack([r.known[i] for r in runs])
        out.append({"step": int(step), "known_drop": drop_or_none(start, end, seed),
                    "stream_em": mean_interval([float(r.curve["stream_em"].iloc[i]) for r in runs], seed=seed).to_dict()})
    return out


def per_seed_comparison(a: list[SeedRun], b: list[SeedRun], level: float, seed: int) -> dict[str, Any] | None:
    """Known-fact drop of `a` minus that of `b` at learning `level`, seed by seed (the same seed learns
    the same facts), each drop relative to its own model's start: for runs on different models, whose
    questions start from different scores and so cannot be paired question by question. The mean
    difference with its interval over seeds, and the sign-flip test over seeds."""
    pa, pb = at_level(a, level), at_level(b, level)
    sa, sb = start_scores(a), start_scores(b)
    if pa is None or pb is None or sa.mean() == 0 or sb.mean() == 0:
        return None
    if [r.seed for r in a] != [r.seed for r in b]:
        raise SmvizError("a per-seed comparison needs the same seeds on both sides")
    diffs = [(sa.mean() - ea.mean()) / sa.mean() - (sb.mean() - eb.mean()) / sb.mean() for ea, eb in zip(pa["end"], pb["end"])]
    return {"difference": mean_interval(diffs, seed=seed).to_dict(), "p_seeds": sign_flip_test(diffs, seed=seed),
            "seeds": len(diffs)}


def pareto_front(points: list[dict[str, Any]]) -> list[str]:
    """Keys of the points no other point beats on both learning (higher) and forgetting (lower)."""
    front = []
    for p in points:
        if p["drop"] is None:
            continue
        dominated = any(q["drop"] is not None and q["learn"] >= p["learn"] and q["drop"] <= p["drop"]
                        and (q["learn"] > p["learn"] or q["drop"] < p["drop"]) for q in points)
        if not dominated:
            front.append(p["key"])
    return front


def choose(study: Study, grid: list[Setting]) -> tuple[Setting, str, list[dict[str, Any]]]:
    """A family's setting on the selection seeds: least forgetting at the target level among those that
    reach it on every selection seed, else the most learning. Returns (setting, why, every point)."""
    seeds = study.plan.selection_seeds
    points = []
    for setting in grid:
        runs = study.seed_runs(setting, seeds)
        start = start_scores(runs).mean()
        point = at_level(runs, study.plan.target)
        drop_at = None if point is None or start == 0 else float(np.mean([(start - e.mean()) / start for e in point["end"]]))
        points.append({"key": setting.key, "learn": float(np.mean([r.curve["stream_em"].iloc[-1] for r in runs])),
                       "drop": None if start == 0 else float(np.mean([r.curve["known_drop"].iloc[-1] for r in runs])),
                       "drop_at_target": drop_at})
    reaching = [(p, s) for p, s in zip(points, grid) if p["drop_at_target"] is not None]
    if reaching:
        p, s = min(reaching, key=lambda ps: (round(ps[0]["drop_at_target"], 9), -ps[0]["learn"]))
        return s, f"least forgetting at stream EM {study.plan.target:g} ({p['drop_at_target']:.1%})", points
    p, s = max(zip(points, grid), key=lambda ps: (round(ps[0]["learn"], 9), -(ps[0]["drop"] or 0.0)))
    return s, f"no setting reached stream EM {study.plan.target:g}: the most learning ({p['learn']:.3f})", points


def run_study(study: Study, model: MemoryModel) -> dict[str, Any]:
    plan = study.plan
    seed = 0  # of every bootstrap and permutation
    print("0. the dense twin", flush=True)
    dense_twin_model = study.pretrain_dense_twin()
    print(f"1. selection on seeds {list(plan.selection_seeds)} ({plan.facts} facts each)", flush=True)
    grid = selection_grid(plan, model.memory_config.value_lr_mult)
    study.prefetch([s for settings in grid.values() for s in settings], plan.selection_seeds)
    chosen: dict[str, Setting] = {}
    selection: dict[str, Any] = {}
    for family, settings in grid.items():
        chosen[family], why, points = choose(study, settings)
        selection[family] = {"chosen": chosen[family].key, "why": why, "settings": len(settings), "points": points,
                             "pareto": pareto_front(points)}
    print("2. control backgrounds", flush=True)
    backgrounds = study.backgrounds()

    print(f"3. report seeds {list(plan.report_seeds)}", flush=True)
    report = plan.report_seeds
    sparse = chosen["sparse"]
    c1 = {bg: [replace(sparse, lr=lr, background=bg) for lr in plan.sparse_lrs] for bg in ("pretraining", *BACKGROUND_MIXTURES)}
    c7 = {family: replace(chosen[family], composition="statements") for family in ("sparse", "full", "lora")}
    rules = {rule: Setting(rule, rule, "sgd", sparse.lr) for rule in plan.rules}
    study.prefetch([*(chosen[f] for f in (*MAIN, *DENSE)), *(s for ss in c1.values() for s in ss), *c7.values(),
                    *rules.values()], report)
    main = {family: study.seed_runs(chosen[family], report) for family in MAIN}
    dense = {family: study.seed_runs(chosen[family], report) for family in DENSE}
    for settings in c1.values():
        for s in settings:
            study.run(s, report)
    for s in (*c7.values(), *rules.values()):
        study.run(s, report)

    reach = min(float(r.curve["stream_em"].max()) for runs in (*main.values(), *dense.values()) for r in runs)
    level = reach if reach > 0 else None
    matched: dict[str, Any] = {"level": level}
    if level is not None:
        matched["forgetting"] = {f: forgetting_at(runs, level, seed) for f, runs in (main | dense).items()}
        matched["area"] = {f: area_under(runs, level, seed) for f, runs in (main | dense).items()}
        start = start_scores([r for runs in main.values() for r in runs])
        sparse_end = at_level(main["sparse"], level)["end"]
        matched["paired"] = {}
        for f in MAIN[1:] if start.mean() > 0 else ():
            other = at_level(main[f], level)["end"]
            matched["paired"][f] = {"difference": drop_difference(start, sparse_end, other, seed=seed).to_dict(),
                                    **drop_difference_test(start, sparse_end, other, seed=seed)}
        matched["dense_paired"] = {f: per_seed_comparison(main["sparse"], runs, level, seed) for f, runs in dense.items()}
        rule_runs = {"tf-idf": main["sparse"], **{r: study.seed_runs(s, report) for r, s in rules.items()}}
        matched["rules"] = {r: forgetting_at(runs, level, seed) for r, runs in rule_runs.items()}
    steps = {f: equal_steps(runs, seed) for f, runs in (main | dense).items()}

    def end_row(setting: Setting) -> dict[str, Any]:
        runs = study.seed_runs(setting, report)
        start = start_scores(runs)
        return {"key": setting.key, "label": setting.label,
                "stream_em": mean_interval([float(r.curve["stream_em"].iloc[-1]) for r in runs], seed=seed).to_dict(),
                "known_drop": drop_or_none(start, np.stack([r.known[-1] for r in runs]), seed),
                "nll_change": mean_interval([float(r.curve["nll_change"].iloc[-1]) for r in runs], seed=seed).to_dict(),
                "at_matched": None if level is None else forgetting_at(runs, level, seed)}

    sparse_runs = [r for settings in c1.values() for s in settings for r in study.seed_runs(s, report)]
    shares = np.array([x for r in sparse_runs for x in r.zero_score_share])
    return {
        "dense_twin": dense_twin_model,
        "chosen": {f: s.key for f, s in chosen.items()},
        "selection": selection,
        "backgrounds": backgrounds,
        "matched": matched,
        "equal_steps": steps,
        "main_end": {f: end_row(chosen[f]) for f in (*MAIN, *DENSE)},
        "c1_backgrounds": {bg: [end_row(s) for s in settings] for bg, settings in c1.items()},
        "c7_statements": {f: end_row(s) for f, s in c7.items()},
        "rules_end": {r: end_row(s) for r, s in rules.items()},
        "c10_zero_score_share": {"mean": float(shares.mean()), "max": float(shares.max()),
                                 "steps_with_any": float(np.mean(shares > 0)), "steps": int(len(shares)),
                                 "runs": len(sparse_runs)},
    }


# --------------------------------------------------------------------------- output


def iv(d: dict[str, Any] | None, pct: bool = False, sign: bool = False) -> str:
    if d is None or d["estimate"] is None or not np.isfinite(d["estimate"]):
        return "—"
    return Interval(d["estimate"], d["lo"], d["hi"], d["n"], d["level"]).format(pct=pct, sign=sign)


def markdown(doc: dict[str, Any]) -> str:
    st, plan = doc["study"], doc["plan"]
    n_seeds, n_q = len(plan["report_seeds"]), doc["protocol"]["known"]["n"]
    lines = [
        f"# The headline under a reviewer's controls: results (`{NAME}.py`)", "",
        f"Generated by `{doc['command']}`: model `{doc['model']['hash']}`, {n_seeds} report seeds (seeds "
        f"{plan['report_seeds']}) and {len(plan['selection_seeds'])} selection seeds ({plan['selection_seeds']}), "
        f"{plan['facts']} new facts per seed, {plan['facts'] * plan['steps_per_fact']} steps "
        f"({plan['steps_per_fact']} per fact) of {plan['batch_size']} rows drawn from the fact's statements "
        "(and, unless the row says statements only, its training-template Q/A lines). Learning: exact "
        "match on the held-out question templates of the seed's facts (stream EM). Forgetting: "
        f"relative drop of exact match on {n_q} known facts' held-out questions ({doc['protocol']['known']['questions']} "
        "questions), and the change in held-out NLL per token. Intervals: 95 % percentile bootstrap. "
        "Drops are resampled over seeds and questions together, other numbers over seeds; "
        f"n = {n_seeds} seeds.", "",
        "## Settings chosen on the selection seeds", "",
        f"Each family takes its setting with the least forgetting at stream EM {plan['target']:g}, among "
        "those that reach it on every selection seed; if none does, the one that learns most.", "",
        "| family | settings in its grid | chosen | why | Pareto front (of its grid) |", "|---|---|---|---|---|",
    ]
    for f, sel in st["selection"].items():
        lines.append(f"| {LABEL[f]} | {sel['settings']} | `{sel['chosen']}` | {sel['why']} | {len(sel['pareto'])} settings |")
    level = st["matched"]["level"]
    lines += ["", "## Matched learning (report seeds)", ""]
    if level is None:
        lines += ["A chosen setting learned nothing on some report seed: no common learning level exists.", ""]
    else:
        lines += [f"Forgetting where each run's stream EM first reaches **{level:.3f}**, the highest level that "
                  "every chosen setting reaches on every report seed. Interpolated between evaluations, per "
                  "question. The area is the mean known-fact drop over the learning levels up to that one.", "",
                  "| setting | step reached | known-fact drop | Δ held-out NLL | area (mean drop over levels) |",
                  "|---|---|---|---|---|"]
        for f in (*MAIN, *DENSE):
            m = st["matched"]["forgetting"][f]
            lines.append(f"| {LABEL[f]}: `{st['chosen'][f]}` | {m['step']:.0f} | {iv(m['known_drop'], pct=True)} | "
                         f"{iv(m['nll_change'], sign=True)} | {iv(st['matched']['area'][f], pct=True)} |")
        lines += ["", "Paired comparisons, sparse against each baseline: the difference in known-fact drop "
                  "(sparse − baseline; negative means sparse forgets less) and two-sided sign-flip p-values. "
                  f"Over seeds, {n_seeds} seeds cannot go below p = {2 / 2 ** n_seeds:.3g}. Over questions, each "
                  "question's seed-mean difference is flipped.", "",
                  "| baseline | difference | p (seeds) | p (questions) |", "|---|---|---|---|"]
        for f, p in st["matched"]["paired"].items():
            lines.append(f"| {LABEL[f]} | {iv(p['difference'], pct=True, sign=True)} | {p['p_seeds']:.3g} | {p['p_questions']:.3g} |")
        for f, p in st["matched"]["dense_paired"].items():  # other model: seeds pair, questions do not
            lines.append(f"| {LABEL[f]} | " + ("— | — | — |" if p is None else
                                              f"{iv(p['difference'], pct=True, sign=True)} (over seeds) | {p['p_seeds']:.3g} | — |"))
        lines += ["", "### Selection rules at sparse's chosen rate (matched learning)", "",
                  "| rule | step reached | known-fact drop | Δ held-out NLL |", "|---|---|---|---|"]
        for r, m in st["matched"]["rules"].items():
            lines.append(f"| {r} | " + ("— (not reached) | — | — |" if m is None else
                                        f"{m['step']:.0f} | {iv(m['known_drop'], pct=True)} | {iv(m['nll_change'], sign=True)} |"))
    families = [f for f in (*MAIN, *DENSE) if f in st["equal_steps"]]
    lines += ["", "## Forgetting at equal steps (C2)", "",
              "| step | " + " | ".join(LABEL[f] for f in families) + " |", "|---|" + "---|" * len(families)]
    for i, row in enumerate(st["equal_steps"]["sparse"]):
        cells = [f"{iv(st['equal_steps'][f][i]['known_drop'], pct=True)} (EM {st['equal_steps'][f][i]['stream_em']['estimate']:.3f})"
                 for f in families]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    header = ("| setting | stream EM at the end | known-fact drop at the end | Δ NLL at the end | drop at matched learning |\n"
              "|---|---|---|---|---|")

    def row(e: dict[str, Any]) -> str:
        am = e["at_matched"]
        return (f"| {e['label']} | {iv(e['stream_em'])} | {iv(e['known_drop'], pct=True)} | {iv(e['nll_change'], sign=True)} | "
                f"{'— (not reached)' if am is None else iv(am['known_drop'], pct=True)} |")

    lines += ["", "## Chosen settings at the end of the stream", "", header, *[row(e) for e in st["main_end"].values()]]
    lines += ["", "## C1: the background (sparse at every rate of its grid)", "",
              "The model's own background is its pretraining mixture, which holds the known facts' documents. "
              "The controls count corpus text only, and the pretraining mixture without the known people's "
              "documents.", "", header]
    for bg, rows in st["c1_backgrounds"].items():
        lines += [row(e) for e in rows]
    lines += ["", "## C7: statements only (the paper's setting)", "", header, *[row(e) for e in st["c7_statements"].values()]]
    lines += ["", "## Selection rules at the end of the stream", "", header, *[row(e) for e in st["rules_end"].values()]]
    z = st["c10_zero_score_share"]
    lines += ["", "## C10: TF-IDF picks scored 0", "",
              f"Over {z['steps']} steps of {z['runs']} sparse runs, {z['mean']:.2%} of the top-t picks scored 0 "
              f"(max {z['max']:.2%} in one step; {z['steps_with_any']:.0%} of steps had any). A pick scored 0 is a "
              "slot read in every background batch, so its place among the top-t goes by slot id.", ""]
    tw = st["dense_twin"]
    lines += ["## C5′: the dense twin", "",
              f"`{tw['model_dir']}` (model `{tw['hash']}`): the memory model's pretraining recipe with no memory and "
              f"every FFN {tw['config']['model']['intermediate_size']} wide, so that a token uses as many parameters "
              f"as in the memory model; {tw['parameters']:,} parameters in all. Its full finetuning and LoRA rows are "
              "in the tables above; each drop is relative to the dense model's own start.", ""]
    return "\n".join(lines)


def figures(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = doc["study"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for f in st["equal_steps"]:
        rows = st["equal_steps"][f]
        steps = [r["step"] for r in rows]
        for ax, col, scale in ((axes[0], "stream_em", 1), (axes[1], "known_drop", 100)):
            if any(r[col] is None for r in rows):  # no relative drop: the model knew none of the questions
                continue
            est = np.array([r[col]["estimate"] for r in rows], dtype=float) * scale
            lo = np.array([r[col]["lo"] for r in rows], dtype=float) * scale
            hi = np.array([r[col]["hi"] for r in rows], dtype=float) * scale
            ax.plot(steps, est, color=COLORS[f], label=LABEL[f])
            ax.fill_between(steps, lo, hi, color=COLORS[f], alpha=0.12)
    axes[0].set_title("learning: stream EM")
    axes[1].set_title("forgetting: known-fact drop (%)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Equal steps, report seeds (95 % intervals) — model {doc['model']['hash']}")
    fig.tight_layout()
    write_png_atomic(out / f"{NAME}_steps.png", fig)

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for f, sel in st["selection"].items():
        pts = [p for p in sel["points"] if p["drop"] is not None]
        ax.scatter([p["drop"] * 100 for p in pts], [p["learn"] for p in pts], color=COLORS[f], alpha=0.35, s=18)
        front = sorted((p for p in pts if p["key"] in sel["pareto"]), key=lambda p: p["drop"])
        ax.plot([p["drop"] * 100 for p in front], [p["learn"] for p in front], color=COLORS[f], marker="o", label=LABEL[f])
    ax.set_xlabel("known-fact drop at the end (%)")
    ax.set_ylabel("stream EM at the end")
    ax.set_title("Each family's grid on the selection seeds, Pareto front joined")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_png_atomic(out / f"{NAME}_pareto.png", fig)
    plt.close("all")



def write_outputs(study: Study, st: dict[str, Any], command: str, model: MemoryModel) -> None:
    out = Path(study.args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = dict(study.protocol)
    first = next(iter(study.loaded.values()))
    protocol["known"] = {"n": study.args.known_facts, "questions": len(first.question_ids), "text": protocol["known"]}
    stats = SlotStats.load_for_model(study.model_dir, model)
    plan = study.plan
    doc = {
        "format": FORMAT,
        "command": command,
        "model": {"hash": model.model_hash, "memory": model.memory_config.to_dict()},
        "background_statistics": {"unit": stats.unit, "protocol": stats.protocol},
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.__dict__.items()},
        "protocol": protocol,
        "study": st,
        "results": {k: {"setting": e["setting"], "seeds": {str(s): v for s, v in sorted(e["seeds"].items())}}
                    for k, e in sorted(study.results.items())},
    }
    write_json_atomic(out / f"{NAME}.json", doc)
    write_text_atomic(out / f"{NAME}.md", markdown(doc))
    figures(doc, out)
    print(f"wrote {out / NAME}.json, .md, _steps.png, _pareto.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workspace", default="workspace", help="workspace built by `make demo` (its data/ and models/tiny)")
    p.add_argument("--model", default=None, help="model directory with slot_stats.safetensors (default WS/models/tiny)")
    p.add_argument("--quick", action="store_true", help="a small version of every stage")
    p.add_argument("--out", default=None, help="where the results go (default analyses/results; --quick: analyses/results/quick)")
    p.add_argument("--runs", default=None, help="run directories (default WS/controls, or WS/controls-quick with --quick)")
    p.add_argument("--facts", type=int, default=None, help="new facts per seed (default 14, --quick 4)")
    p.add_argument("--top-t", type=int, default=None, help="t of the sparse settings (default 500)")
    p.add_argument("--steps-per-fact", type=int, default=None, help="steps on each fact (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 16)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 14, --quick 4)")
    p.add_argument("--known-facts", type=int, default=100, help="known facts asked for forgetting (default 100)")
    p.add_argument("--heldout-rows", type=int, default=64, help="held-out corpus rows of 128 tokens for NLL (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (the committed results), cuda, or auto")
    p.add_argument("--jobs", type=int, default=1, help="finetuning runs at once, each in its own process on one torch "
                   "thread (default 1: one process, torch's own threads); 2 on 2 CPU cores")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    return a


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.facts is not None:
        plan = replace(plan, facts=args.facts)
    for name in ("top_t", "steps_per_fact", "batch_size", "eval_every"):
        if getattr(args, name) is not None:
            plan = replace(plan, **{name: getattr(args, name)})
    if min(plan.facts, plan.top_t, plan.steps_per_fact, plan.batch_size, plan.eval_every) < 1:
        raise SmvizError("facts, top_t, steps per fact, batch size and eval every must be >= 1")
    return plan


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    from smviz.device import resolve_device

    args.device = resolve_device(args.device)
    if args.out is None:
        args.out = "analyses/results/quick" if args.quick else "analyses/results"
    if args.runs is None:
        args.runs = str(Path(args.workspace) / ("controls-quick" if args.quick else "controls"))
    command = "python analyses/headline_controls.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        plan = make_plan(args)
        study = Study(args, plan)
        model = study.check()
        t0 = time.time()
        st = run_study(study, model)
        write_outputs(study, st, command, model)
    except SmvizError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
