"""`smviz demo`: the default workspace built end to end as a list of stages run in order — fact world
and corpus, tokenizer, a model pretrained from scratch with its preset's recipe, its evaluation (facts
known with the memory on and off, held-out NLL, slot usage), background slot statistics, a trace of the
new facts, short streams of new facts learned with `sparse`, `full` and `lora`, and reports. Each stage
says about how long it takes and is skipped when its output is already there, so a re-run costs
seconds; interrupted pretraining, statistics, recording and finetuning resume. The evaluation is
checked against the project's thresholds at the end (`threshold_checks`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from smviz.data.world import WorldConfig
from smviz.device import resolve_device, seed_everything
from smviz.errors import TraceError
from smviz.record import read_documents, record_texts
from smviz.trace import Trace
from smviz.train.recipes import recipe
from smviz.workspace.layout import Workspace
from smviz.workspace.stages.base import Plan, Stage
from smviz.workspace.stages.data import TOKENIZER, WORLD
from smviz.train.rundir import FinetuneRunDir
from smviz.workspace.stages.finetune import stream_stage
from smviz.workspace.stages.pretrain import EVALUATE, PRETRAIN, stored_evaluation
from smviz.workspace.stages.reports import REPORTS
from smviz.workspace.stages.stats import STATS

log = logging.getLogger(__name__)

# The micro demo runs in about a minute: a small world keeps its evaluation short.
DEMO_WORLDS = {"micro": dict(n_known=20, n_bio_only=10, n_new=10)}
# Background batches and stream settings per preset (tiny: the paper's 1,000 batches; the 20-fact
# stream of analyses/finetuning.md with FinetuneConfig's defaults).
DEMO_STATS_BATCHES = {"micro": 50, "tiny": 1000}
DEMO_STREAMS: dict[str, dict[str, Any]] = {
    "micro": dict(max_facts=5, known_facts=20, heldout_rows=8, config=dict(top_t=32, steps_per_fact=2, eval_every=5)),
    "tiny": dict(max_facts=20, known_facts=100, heldout_rows=64, config={}),
}
DEMO_METHODS = ("sparse", "full", "lora")
TRACE_NAME = "new-facts"
# About how long each stage takes on 2 CPU cores (measured; shown before the stage runs).
ESTIMATES = {
    "tiny": {"data": "10 s", "tokenizer": "10 s", "pretrain": "20 min", "evaluate": "80 s", "stats": "2-5 min",
             "trace": "20 s", "sparse": "20 s", "full": "45 s", "lora": "25 s", "reports": "20 s"},
    "micro": {"data": "10 s", "tokenizer": "5 s", "pretrain": "1 min", "evaluate": "20 s", "stats": "5 s",
              "trace": "5 s", "sparse": "10 s", "full": "10 s", "lora": "10 s", "reports": "15 s"},
}
# The thresholds the tiny model's evaluation is held to (analyses/memory_usage.md): facts recalled on
# held-out question templates, and recalled through the memory (known EM at least halves without it).
THRESHOLDS = {"known_em": 0.6, "bio_only_em": 0.3, "memory_off_ratio": 0.5}


# --------------------------------------------------------------------------- trace


def _trace_done(plan: Plan) -> bool:
    try:
        Trace.load(plan.ws.trace(plan.trace_name)).check_model(plan.model)
    except TraceError:
        return False
    return True


def _trace_run(plan: Plan) -> str:
    path = plan.ws.trace(plan.trace_name)
    docs, source = read_documents(plan.ws.facts("new"))
    trace = record_texts(plan.model, docs, path, source=source, force=path.exists())
    return f"→ {path} ({trace.n_tokens:,} tokens, {trace.n_accesses:,} reads)"


TRACE = Stage(
    "trace",
    title=lambda plan: "recording which slots every token of the new facts reads",
    done=_trace_done,
    run=_trace_run,
    skipped=lambda plan: f"trace of the new facts already in {plan.ws.trace(plan.trace_name)}",
)


DEMO_STAGES: tuple[Stage, ...] = (WORLD, TOKENIZER, PRETRAIN, EVALUATE, STATS, TRACE,
                                  *(stream_stage(m) for m in DEMO_METHODS), REPORTS)


# --------------------------------------------------------------------------- running them


def run_stages(stages: Sequence[Stage], plan: Plan, say: Callable[[str], None], estimates: dict[str, str]) -> None:
    """Run each stage that is not done, in order, saying what it does and how long it took."""
    for i, stage in enumerate(stages, start=1):
        head = f"[{i}/{len(stages)}]"
        if stage.done(plan):
            say(f"{head} {stage.skipped(plan)} — skipped")
        else:
            estimate = estimates.get(stage.name)
            say(f"{head} {stage.title(plan)}" + (f" (about {estimate})" if estimate else ""))
            t0 = time.perf_counter()
            line = stage.run(plan)
            seconds = time.perf_counter() - t0
            say(f"      done in {seconds / 60:.1f} min {line}" if seconds >= 120 else f"      done in {seconds:.0f}s {line}")
        if stage.report is not None:
            say(stage.report(plan))


def threshold_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation against THRESHOLDS: per criterion its measured value, the threshold and whether it passes."""
    qa = result["memory_on"]["qa"]
    known = qa.get("known", {}).get("em")
    bio = qa.get("bio_only", {}).get("em")
    drop = result.get("derived", {}).get("known_em_drop")
    ratio = None if drop is None else 1 - drop
    rows = [("known EM", known, ">=", THRESHOLDS["known_em"]), ("bio-only EM", bio, ">=", THRESHOLDS["bio_only_em"]),
            ("known EM memory off/on", ratio, "<=", THRESHOLDS["memory_off_ratio"])]
    return [{"criterion": name, "measured": value, "threshold": f"{op} {limit}",
             "pass": value is not None and (value >= limit if op == ">=" else value <= limit)}
            for name, value, op, limit in rows]


def format_thresholds(checks: list[dict[str, Any]]) -> str:
    """One line: each criterion, its measured value and threshold, PASS or FAIL."""
    parts = [f"{c['criterion']} {'n/a' if c['measured'] is None else format(c['measured'], '.3f')} {c['threshold']} "
             f"{'PASS' if c['pass'] else 'FAIL'}" for c in checks]
    return "thresholds (analyses/memory_usage.md, set for the tiny model): " + "; ".join(parts)


def run_demo(
    workspace: str | os.PathLike,
    *,
    preset: str = "tiny",
    device: str = "auto",
    say: Callable[[str], None] = log.info,
    **recipe_overrides: Any,
) -> dict[str, Any]:
    """Run the demo's stages into `workspace`; returns the pretrained model's evaluation, its threshold
    checks, the streams' summaries and the reports' paths (also on disk: WS/reports/, WS/runs/)."""
    config = recipe(preset, **recipe_overrides)
    seed_everything(config.seed)
    plan = Plan(
        ws=Workspace(workspace), name=preset, config=config, device=resolve_device(device),
        world=WorldConfig(seed=config.seed, **DEMO_WORLDS.get(preset, {})),
        stats_batches=DEMO_STATS_BATCHES.get(preset, DEMO_STATS_BATCHES["tiny"]),
        stream=DEMO_STREAMS.get(preset, DEMO_STREAMS["tiny"]), methods=DEMO_METHODS, trace_name=TRACE_NAME,
    )
    run_stages(DEMO_STAGES, plan, say, ESTIMATES.get(preset, {}))
    ws = plan.ws
    evaluation = stored_evaluation(ws, plan.name, plan.model)
    checks = threshold_checks(evaluation)
    say(format_thresholds(checks))
    return {
        "evaluation": evaluation,
        "thresholds": checks,
        "runs": {m: FinetuneRunDir(ws.run(m)).summary() for m in plan.methods},
        "reports": {"diff": str(ws.diff_report(plan.methods[0])), "runs": str(ws.runs_report)},
    }
