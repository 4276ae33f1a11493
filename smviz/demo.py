"""`smviz demo`: build the default workspace end to end — fact world and corpus, tokenizer, a model
pretrained from scratch with its preset's recipe and its evaluation (facts known with the memory on
and off, held-out NLL, slot usage), background slot statistics, a trace of the new facts, short
streams of new facts learned with `sparse`, `full` and `lora` — then serve the app. Each stage says
about how long it takes and is skipped when its output is already there, so a re-run costs seconds;
interrupted pretraining, statistics, recording and finetuning resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from smviz.data.facts import read_facts, write_facts
from smviz.data.world import WorldConfig
from smviz.device import resolve_device, seed_everything
from smviz.errors import TraceError
from smviz.evaluate import format_report
from smviz.io import write_json_atomic
from smviz.model import MemoryModel, verify_model_dir
from smviz.pipeline import (
    build_data,
    evaluate_workspace_model,
    run_finetune,
    run_pretraining,
)
from smviz.record import read_documents, record_texts
from smviz.report import build_diff_report, build_run_report, render_html, write_report
from smviz.serve import serve_app
from smviz.stats import STATS_FILE, SlotStats, SlotStatsError, background_stats
from smviz.trace import Trace
from smviz.train.finetune import FinetuneConfig
from smviz.train.pretrain import recipe
from smviz.workspace import Workspace

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
    "tiny": {"data": "10 s", "pretrain": "20 min", "evaluate": "80 s", "stats": "2-5 min", "trace": "20 s",
             "sparse": "20 s", "full": "45 s", "lora": "25 s", "reports": "20 s"},
    "micro": {"data": "10 s", "pretrain": "1 min", "evaluate": "20 s", "stats": "5 s", "trace": "5 s",
              "sparse": "10 s", "full": "10 s", "lora": "10 s", "reports": "15 s"},
}


def run_demo(
    workspace: str | os.PathLike,
    *,
    preset: str = "tiny",
    device: str = "auto",
    app: bool = False,
    port: int = 8501,
    say: Callable[[str], None] = print,
    **recipe_overrides: Any,
) -> dict[str, Any]:
    """Run the demo stages into `workspace` (then serve the app when `app`); returns the pretrained
    model's evaluation and the streams' summaries (also on disk: WS/reports/, WS/runs/)."""
    ws = Workspace(workspace)
    dev = resolve_device(device)
    config = recipe(preset, **recipe_overrides)
    seed_everything(config.seed)
    name = preset
    estimate = ESTIMATES.get(preset, {})
    stages = 6 + len(DEMO_METHODS)

    def stage(i: int, key: str, what: str) -> float:
        say(f"[{i}/{stages}] {what}" + (f" (about {estimate[key]})" if key in estimate else ""))
        return time.perf_counter()

    t0 = stage(1, "data", "fact world and corpus")
    wrote = build_data(ws.data, WorldConfig(seed=config.seed, **DEMO_WORLDS.get(preset, {})))
    say(f"      {ws.data}: " + (f"written ({time.perf_counter() - t0:.0f}s)" if wrote else "already present — skipped"))

    model_dir = ws.model(name)
    if model_dir.exists():
        verify_model_dir(model_dir)
        say(f"[2/{stages}] {model_dir} already pretrained and verified — skipped")
        model = MemoryModel.from_pretrained(model_dir, device=dev)
    else:
        t0 = stage(2, "pretrain", f"pretraining {preset!r}: {config.steps} steps of {config.batch_size}x{config.seq_len} tokens on {dev} "
                   f"(progress in {ws.pretrain_run(name) / 'metrics.jsonl'}; resumes if interrupted)")
        model = run_pretraining(ws, name, config, device=dev)
        say(f"      done in {(time.perf_counter() - t0) / 60:.1f} min → {model_dir} (model {model.model_hash})")

    report_path = ws.reports / f"pretrain-{name}.json"
    if report_path.is_file() and json.loads(report_path.read_text()).get("model_hash") == model.model_hash:
        result = json.loads(report_path.read_text())
        say(f"[3/{stages}] evaluation of model {model.model_hash} already in {report_path} — skipped")
    else:
        t0 = stage(3, "evaluate", "evaluating the pretrained model")
        result = evaluate_workspace_model(ws, model)
        write_json_atomic(report_path, result)
        say(f"      done in {time.perf_counter() - t0:.0f}s → {report_path}")
    say(format_report(result))

    _background_stats(ws, model_dir, model, preset, dev, stage, say, stages)
    _trace_new_facts(ws, model, stage, say, stages)
    summaries = {}
    stream = DEMO_STREAMS.get(preset, DEMO_STREAMS["tiny"])
    for i, method in enumerate(DEMO_METHODS, start=6):
        done = ws.run(method) / "summary.json"
        if done.is_file():
            summaries[method] = json.loads(done.read_text())
            say(f"[{i}/{stages}] {method} stream already finished in {ws.run(method)} — skipped")
            continue
        t0 = stage(i, method, f"learning {stream['max_facts']} new facts with {method} → {ws.run(method)}")
        summary = run_finetune(
            model_dir, ws.run(method), FinetuneConfig(method=method, **stream["config"]),
            facts=ws.data / "facts-new.jsonl", known=ws.data / "facts-known.jsonl", heldout=ws.data / "corpus-heldout.jsonl",
            max_facts=stream["max_facts"], known_facts=stream["known_facts"], heldout_rows=stream["heldout_rows"], device=dev,
        )
        summaries[method] = summary
        m = summary["metrics"]
        say(f"      {time.perf_counter() - t0:.0f}s: learned EM {m['learning_em']['end']:.3f}, known-fact EM "
            f"{m['known_em']['start']:.3f} → {m['known_em']['end']:.3f}, held-out NLL {m['heldout_nll']['change']:+.3f}")
    reports = _reports(ws, model_dir, stream["max_facts"], stage, say, stages)
    if app:
        say(f"serving the app for {ws.root} (Ctrl-C stops it)")
        serve_app(ws.root, port=port)
    else:
        say(f"browse it with: smviz app --workspace {ws.root}")
    return {"evaluation": result, "runs": summaries, "reports": reports}


def _background_stats(ws: Workspace, model_dir, model: MemoryModel, preset: str, dev, stage, say, stages: int) -> None:
    if (model_dir / STATS_FILE).is_file():
        try:
            SlotStats.load_for_model(model_dir, model)
            say(f"[4/{stages}] background slot statistics already in {model_dir / STATS_FILE} — skipped")
            return
        except SlotStatsError:
            pass  # computed for another model: recompute
    batches = DEMO_STATS_BATCHES.get(preset, DEMO_STATS_BATCHES["tiny"])
    t0 = stage(4, "stats", f"background slot statistics over {batches} batches of the pretraining mixture")
    background_stats(ws, model_dir, n_batches=batches, device=dev)
    say(f"      done in {time.perf_counter() - t0:.0f}s → {model_dir / STATS_FILE}")


def _trace_new_facts(ws: Workspace, model: MemoryModel, stage, say, stages: int) -> None:
    path = ws.trace(TRACE_NAME)
    try:
        Trace.load(path).check_model(model)
        say(f"[5/{stages}] trace of the new facts already in {path} — skipped")
        return
    except TraceError:
        pass
    t0 = stage(5, "trace", "recording which slots every token of the new facts reads")
    docs, source = read_documents(ws.data / "facts-new.jsonl")
    trace = record_texts(model, docs, path, source=source, force=path.exists())
    say(f"      done in {time.perf_counter() - t0:.0f}s → {path} ({trace.n_tokens:,} tokens, {trace.n_accesses:,} reads)")


def _reports(ws: Workspace, model_dir, n_facts: int, stage, say, stages: int) -> dict[str, str]:
    """The diff report of the sparse stream (base model → its finetuned model, on the stream's facts)
    and the run report of the three streams side by side, in WS/reports/."""
    diff_html, runs_html = ws.reports / "diff-sparse.html", ws.reports / "runs.html"
    paths = {"diff": str(diff_html), "runs": str(runs_html)}
    if diff_html.is_file() and runs_html.is_file():
        say(f"[{stages}/{stages}] reports already in {ws.reports} — skipped")
        return paths
    t0 = stage(stages, "reports", "a diff report of the sparse stream and a run report of all three")
    stream_facts = ws.reports / "stream-facts.jsonl"
    write_facts(stream_facts, read_facts(ws.data / "facts-new.jsonl")[:n_facts])
    diff = build_diff_report(model_dir, ws.run("sparse") / "model", stream_facts, ws.data / "facts-known.jsonl",
                             heldout_path=ws.data / "corpus-heldout.jsonl", run_dir=ws.run("sparse"))
    write_report(diff, render_html(diff), diff_html, "html")
    runs = build_run_report([ws.run(m) for m in DEMO_METHODS])
    write_report(runs, render_html(runs), runs_html, "html")
    say(f"      done in {time.perf_counter() - t0:.0f}s → {diff_html}, {runs_html} (numbers in the .json beside each)")
    return paths
