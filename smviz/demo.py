"""`smviz demo`: build the default workspace end to end — fact world and corpus, tokenizer, a model
pretrained from scratch with its preset's recipe — and print its evaluation (facts known, with the
memory on and off; held-out NLL; slot usage). Stages already done are skipped, so a re-run costs
seconds; an interrupted pretraining resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from smviz.data.world import WorldConfig
from smviz.device import resolve_device, seed_everything
from smviz.evaluate import format_report
from smviz.io import write_json_atomic
from smviz.model import MemoryModel, verify_model_dir
from smviz.pipeline import build_data, evaluate_workspace_model, run_pretraining
from smviz.train.pretrain import recipe
from smviz.workspace import Workspace

log = logging.getLogger(__name__)

# The micro demo runs in about a minute: a small world keeps its evaluation short.
DEMO_WORLDS = {"micro": dict(n_known=20, n_bio_only=10, n_new=10)}


def run_demo(
    workspace: str | os.PathLike,
    *,
    preset: str = "tiny",
    device: str = "auto",
    say: Callable[[str], None] = print,
    **recipe_overrides: Any,
) -> dict[str, Any]:
    """Run the demo stages into `workspace`; returns the evaluation (also in WS/reports/)."""
    ws = Workspace(workspace)
    dev = resolve_device(device)
    config = recipe(preset, **recipe_overrides)
    seed_everything(config.seed)
    name = preset

    t0 = time.perf_counter()
    wrote = build_data(ws.data, WorldConfig(seed=config.seed, **DEMO_WORLDS.get(preset, {})))
    say(f"[1/3] fact world and corpus in {ws.data}: " + (f"written ({time.perf_counter() - t0:.0f}s)" if wrote else "already present — skipped"))

    model_dir = ws.model(name)
    if model_dir.exists():
        verify_model_dir(model_dir)
        say(f"[2/3] {model_dir} already pretrained and verified — skipped")
        model = MemoryModel.from_pretrained(model_dir, device=dev)
    else:
        say(f"[2/3] pretraining {preset!r}: {config.steps} steps of {config.batch_size}x{config.seq_len} tokens on {dev} "
            f"(progress in {ws.pretrain_run(name) / 'metrics.jsonl'}; resumes if interrupted)")
        t0 = time.perf_counter()
        model = run_pretraining(ws, name, config, device=dev)
        say(f"      done in {(time.perf_counter() - t0) / 60:.1f} min → {model_dir} (model {model.model_hash})")

    report_path = ws.reports / f"pretrain-{name}.json"
    if report_path.is_file() and json.loads(report_path.read_text()).get("model_hash") == model.model_hash:
        result = json.loads(report_path.read_text())
        say(f"[3/3] evaluation of model {model.model_hash} already in {report_path} — skipped")
    else:
        t0 = time.perf_counter()
        result = evaluate_workspace_model(ws, model)
        write_json_atomic(report_path, result)
        say(f"[3/3] evaluated in {time.perf_counter() - t0:.0f}s → {report_path}")
    say(format_report(result))
    return result
