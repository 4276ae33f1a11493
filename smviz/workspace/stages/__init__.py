"""The stages of a workspace (layer 12), each a `Stage` with a `done` check and a `run`: the fact world
and corpus (`data`), the tokenizer, pretraining and its evaluation (`pretrain`), the retrofit of an
imported base model (`retrofit`), background statistics (`stats`), a trace of the new facts, the
finetuning streams (`finetune`) and the reports; the demo runs them in order (`demo`; a real model's:
`real_demo`). The command
line calls these; the modules they call hold the logic."""

from __future__ import annotations

from smviz.workspace.stages.base import Plan, Stage, check_length, max_positions
from smviz.workspace.stages.data import WorkspaceData, build_data, ensure_tokenizer, load_data
from smviz.workspace.stages.demo import DEMO_STAGES, THRESHOLDS, format_thresholds, run_demo, threshold_checks
from smviz.workspace.stages.finetune import parse_probes, run_finetune
from smviz.workspace.stages.models import build_model_dir, check_model_path, model_info
from smviz.workspace.stages.pretrain import (
    evaluate_model_dir,
    evaluate_pretrained,
    evaluate_workspace_model,
    heldout_rows,
    make_stream,
    periodic_evaluator,
    pretrain_config_of,
    run_finished,
    run_pretraining,
    typed_pretrain_config,
)
from smviz.workspace.stages.real_demo import run_real_demo
from smviz.workspace.stages.reports import make_report
from smviz.workspace.stages.retrofit import format_run_evaluation, last_run_evaluation, retrofit_evaluator, run_retrofit
from smviz.workspace.stages.stats import (
    BACKGROUND_STEP_OFFSET,
    DEFAULT_BACKGROUND_BATCHES,
    background_stats,
    stats_path,
)

__all__ = [
    "BACKGROUND_STEP_OFFSET", "DEFAULT_BACKGROUND_BATCHES", "DEMO_STAGES", "THRESHOLDS", "Plan", "Stage",
    "WorkspaceData", "background_stats", "build_data", "build_model_dir", "check_length", "check_model_path",
    "ensure_tokenizer", "evaluate_model_dir", "evaluate_pretrained", "evaluate_workspace_model", "format_run_evaluation",
    "format_thresholds", "heldout_rows", "last_run_evaluation", "load_data", "make_report", "make_stream", "max_positions",
    "model_info", "parse_probes", "periodic_evaluator", "pretrain_config_of", "retrofit_evaluator", "run_demo", "run_real_demo",
    "run_finetune", "run_finished", "run_pretraining", "run_retrofit", "stats_path", "threshold_checks",
    "typed_pretrain_config",
]
