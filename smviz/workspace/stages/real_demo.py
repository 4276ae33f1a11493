"""`smviz demo --model smollm2`: a real pretrained model's workspace built end to end — the model imported
(`smviz import`), the fact world its recipe holds it to, a memory retrofitted with the recipe
(`RETROFIT_RECIPES`, analyses/retrofit.md), the real-knowledge forgetting probe built from the base
(`smviz data probe`), background slot statistics, a trace of the new facts, short streams of new facts
learned with `sparse`, `full` and `lora` (questions in the chat template, the probe measuring
forgetting) and the reports. The stages are the tiny demo's where they can be (`demo`); each is skipped
when its output is there, and the retrofit, statistics, trace and streams resume when interrupted."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smviz.data.world import WorldConfig
from smviz.device import resolve_device, seed_everything
from smviz.errors import ModelFileError
from smviz.evaluate.probe import REAL_KNOWLEDGE, REAL_KNOWLEDGE_SOURCE, answering_model, build_probe, provenance_path, write_probe
from smviz.model import import_model, model_dir_hash, verify_model_dir
from smviz.model.format import is_base_model_dir
from smviz.train.recipes import RETROFIT_RECIPES, retrofit_recipe
from smviz.train.rundir import FinetuneRunDir
from smviz.workspace.layout import Workspace
from smviz.workspace.stages.base import Plan, Stage
from smviz.workspace.stages.data import WORLD
from smviz.workspace.stages.demo import DEMO_METHODS, TRACE, TRACE_NAME, run_stages
from smviz.workspace.stages.finetune import read_qa, source, stream_stage
from smviz.workspace.stages.reports import REPORTS
from smviz.workspace.stages.retrofit import format_run_evaluation, last_run_evaluation, run_retrofit
from smviz.workspace.stages.stats import STATS

log = logging.getLogger(__name__)

PROBE_FILE = "probe-real.jsonl"
REAL_STATS_BATCHES = 100  # 1,600 rows of 96 tokens: about 7 minutes on 2 CPU cores
# Short streams: 4 new facts, 5 steps of 8 rows each. Sparse SGD at lr 30,000: on the retrofitted SmolLM2
# the default 1,000 (the tiny model's) moves its value rows too little, and 30,000 learned with no probe
# loss in analyses/real_model.py (100,000 learned more and cost 32 % of the probe).
REAL_STREAM: dict[str, Any] = dict(
    max_facts=4, known_facts=20, heldout_rows=16, probes={"real": PROBE_FILE}, probe_set=REAL_KNOWLEDGE,
    config=dict(batch_size=8, steps_per_fact=5, eval_every=10), per_method={"sparse": {"lr": 30000.0}},
)
ESTIMATES = {"import": "1 min", "data": "10 s", "retrofit": "30 min", "probe": "2 min", "stats": "7 min",
             "trace": "1 min", "sparse": "4 min", "full": "6 min", "lora": "5 min", "reports": "3 min"}


def import_stage(src: str) -> Stage:
    """`src` (a built-in name, a HF directory or a .gguf file) imported as the plan's base model."""

    def done(plan: Plan) -> bool:
        base = Path(plan.config.base)
        if not base.exists():
            return False
        verify_model_dir(base)
        if not is_base_model_dir(base):
            raise ModelFileError(f"{base} holds a model with a memory, not the imported base the demo starts from")
        return True

    def run(plan: Plan) -> str:
        info = import_model(src, plan.config.base)
        return f"→ {info['path']} (model {info['model_hash']}, {info['parameters']:,} parameters, {info['blocks']} blocks)"

    return Stage("import", title=lambda plan: f"importing {src} → {plan.config.base}", done=done, run=run,
                 skipped=lambda plan: f"{plan.config.base} already imported and verified")


def _retrofit_done(plan: Plan) -> bool:
    if not plan.model_dir.exists():
        return False
    plan.model  # verified and loaded
    return True


def _retrofit_run(plan: Plan) -> str:
    plan.loaded = run_retrofit(plan.ws, plan.name, plan.config, device=plan.device)
    return f"→ {plan.model_dir} (model {plan.loaded.model_hash})"


def _retrofit_report(plan: Plan) -> str:
    record = last_run_evaluation(plan.ws, plan.name)
    return "" if record is None else format_run_evaluation(record)


RETROFIT = Stage(
    "retrofit",
    title=lambda plan: (f"retrofitting a memory (blocks {plan.config.memory.get('layers', 'default')}): {plan.config.steps} "
                        f"steps of {plan.config.batch_size}x{plan.config.seq_len} tokens on {plan.device}, the base frozen "
                        f"(progress in {plan.ws.pretrain_run(plan.name) / 'metrics.jsonl'}; resumes if interrupted)"),
    done=_retrofit_done,
    run=_retrofit_run,
    skipped=lambda plan: f"{plan.model_dir} already retrofitted and verified",
    report=_retrofit_report,
)


def _probe_done(plan: Plan) -> bool:
    path = plan.ws.data / PROBE_FILE
    if not (path.is_file() and provenance_path(path).is_file()):
        return False
    try:
        made_by = json.loads(provenance_path(path).read_text()).get("model_hash")
    except (OSError, json.JSONDecodeError):
        return False
    return made_by == model_dir_hash(Path(plan.config.base))


def _probe_run(plan: Plan) -> str:
    qa_set = Path(plan.stream["probe_set"])
    items = read_qa(qa_set, "the probe's QA set")
    model = answering_model(plan.config.base, device=plan.device)
    kept, provenance = build_probe(model, items, prompt_format=plan.stream["prompt_format"])
    described = {"description": REAL_KNOWLEDGE_SOURCE} if qa_set == REAL_KNOWLEDGE else {}
    write_probe(plan.ws.data / PROBE_FILE, kept, provenance, source=source(qa_set) | described)
    return f"→ {plan.ws.data / PROBE_FILE}: the base answers {len(kept)} of {len(items)} questions of {qa_set.name}"


PROBE = Stage(
    "probe",
    title=lambda plan: "the real-knowledge forgetting probe: the questions the base model answers correctly",
    done=_probe_done,
    run=_probe_run,
    skipped=lambda plan: f"probe of the base model already in {plan.ws.data / PROBE_FILE}",
)


def run_real_demo(
    workspace: str | os.PathLike,
    *,
    src: str = "smollm2",
    recipe_name: str = "smollm2",
    device: str = "auto",
    say: Callable[[str], None] = log.info,
    stream: dict[str, Any] | None = None,
    stats_batches: int = REAL_STATS_BATCHES,
    **overrides: Any,
) -> dict[str, Any]:
    """Build the real-model workspace of `src` in `workspace` with retrofit recipe `recipe_name`
    (`overrides`: RetrofitConfig fields; its prompt format is the streams' and the probe's too; `stream`:
    the streams' settings over REAL_STREAM, `probe_set` the QA set the probe is built from); returns
    the retrofit's last evaluation, the probe's size, the streams' summaries and the reports' paths. A
    base other than the recipe's own keeps the recipe but not its memory blocks (the default: two thirds
    of the base's depth)."""
    ws = Workspace(workspace)
    name = Path(src).stem if Path(src).suffix == ".gguf" else Path(src).name
    base = ws.model(name).resolve()
    config = retrofit_recipe(recipe_name, str(base), **overrides)
    if src != recipe_name and "memory" not in overrides:
        config = dataclasses.replace(config, memory={k: v for k, v in config.memory.items() if k != "layers"})
    plan_stream = REAL_STREAM | (stream or {}) | {"prompt_format": config.prompt_format}
    plan = Plan(
        ws=ws, name=f"{name}-memory", config=config, device=resolve_device(device),
        world=WorldConfig(seed=config.seed, **RETROFIT_RECIPES[recipe_name]["world"]), stats_batches=stats_batches,
        stream=plan_stream, methods=DEMO_METHODS, trace_name=TRACE_NAME,
    )
    seed_everything(config.seed)
    stages = [import_stage(src), WORLD, RETROFIT, PROBE, STATS, TRACE, *(stream_stage(m) for m in DEMO_METHODS), REPORTS]
    run_stages(stages, plan, say, ESTIMATES)
    return {
        "retrofit": last_run_evaluation(ws, plan.name),
        "probe": json.loads(provenance_path(ws.data / PROBE_FILE).read_text())["kept"],
        "runs": {m: FinetuneRunDir(ws.run(m)).summary() for m in plan.methods},
        "reports": {"diff": str(ws.diff_report(plan.methods[0])), "runs": str(ws.runs_report)},
    }
