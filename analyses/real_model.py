"""The paper's question on a real pretrained model (issue 16): the retrofitted SmolLM2-135M learns a stream
of new facts with sparse memory finetuning, full finetuning and LoRA, each over a learning-rate sweep;
forgetting is the relative drop on the real-knowledge probe (the NaturalQuestions analogue), on the
world's known facts (which the retrofitted memory holds), and the change of held-out NLL, compared at
matched learning as in the tiny study (analyses/continual_facts.py).

    python analyses/retrofit_thresholds.py --workspace WS --model WS/models/r3   # builds WS/data/probe-real.jsonl
    smviz stats --model WS/models/r3 --workspace WS --batches 100                 # sparse ranks against it
    python analyses/real_model.py --workspace WS --model WS/models/r3            # one seed, under 90 min on 2 CPU cores

Each run learns the first --facts facts of the world's new population (facts-new.jsonl), --steps-per-fact
steps of --batch-size rows each, questions and training Q/A lines in the chat template. Evaluations every
--eval-every steps: the stream facts' held-out questions (learning), the probe (contained, F1, EM; every
k-th of its questions, about --probe-questions of them, to fit 2 CPU cores), the first --known-facts
known facts (EM), held-out NLL of --heldout-rows corpus rows. A method's chosen
setting is the rate with the best learning at the end (ties: less probe drop). Matched learning: each
run's forgetting where its stream EM first reaches a level, interpolated between evaluations; the
headline level is the highest all three chosen settings reach.

Writes analyses/results/real_model.{json,md} and real_model_curves.png, real_model_pareto.png (--out);
run directories go to WS/real_model (--runs). Finished runs are read back, an interrupted one resumes.
Each finished run's record (config, metrics, per-question scores, summary: RECORD_FILES) is copied to
analyses/results/real_model_runs/KEY (--records, committed), and a run found there of the same model
hash, setting and input files (sha256) is read back instead of rerun: a study too long for one session
on 2 CPU cores continues in the next, when that session's retrofit reproduces the model hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smviz.analysis.continual import at_learning, forgetting_curve
from smviz.analysis.runs import Run
from smviz.errors import SmvizError
from smviz.io import write_bytes_atomic, write_json_atomic, write_png_atomic, write_text_atomic
from smviz.model.format import model_dir_hash
from smviz.stats import STATS_FILE
from smviz.train import FinetuneConfig
from smviz.train.rundir import FinetuneRunDir
from smviz.workspace.stages import run_finetune

FORMAT = "smviz-real-model/1"
METHODS = ("sparse", "full", "lora")
OPTIMIZER = {"sparse": "sgd", "full": "adamw", "lora": "adamw"}
# Sparse SGD rates: the retrofitted memory's value rows are 3x the tiny model's in norm and get 5x smaller
# gradients, so a step at lr 1,000 moves the top-500 rows 0.16 of their norm here against 2.2 on the
# tiny model (measured on one fact's batch); the grid starts at 3,000 (100,000 added when 30,000, the
# best of the first three, sat at the grid's edge on r3; 300,000 when 100,000 was the only one to learn
# anything on the r10 recipe's model).
LRS = {"sparse": (3000.0, 10000.0, 30000.0, 100000.0, 300000.0), "full": (1e-5, 3e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3)}
LABEL = {"sparse": "sparse memory (SGD)", "full": "full finetuning (AdamW)", "lora": "LoRA (AdamW)"}
COLORS = {"sparse": "#1f77b4", "full": "#d62728", "lora": "#ff7f0e"}
PROBE = "real"
PROBE_COLUMN = f"forget/{PROBE}/contained"
COLUMNS = ("probe_drop", "probe_f1_drop", "known_drop", "nll_change")
RECORD_FILES = ("config.json", "metrics.jsonl", "questions.jsonl", "summary.json", "study_seconds.json")


def curve_of(run_dir: Path) -> pd.DataFrame:
    """The run's evaluations with every forgetting measure relative to its own start."""
    curve = forgetting_curve(Run(run_dir).metrics)
    for column, source in (("probe_drop", PROBE_COLUMN), ("probe_f1_drop", f"forget/{PROBE}/f1")):
        start = curve[source].iloc[0]
        curve[column] = (start - curve[source]) / start if start else np.nan
    return curve


def probe_file(args: argparse.Namespace) -> Path:
    """The probe the study asks: every k-th question of WS/data/probe-real.jsonl, about --probe-questions
    of them (the whole probe with 0), written once beside the runs."""
    from smviz.data.formats import read_data
    from smviz.data.formats.canonical import write_canonical

    items = read_data(Path(args.workspace) / "data" / "probe-real.jsonl", "qa")[1]
    if not args.probe_questions or args.probe_questions >= len(items):
        return Path(args.workspace) / "data" / "probe-real.jsonl"
    step = -(-len(items) // args.probe_questions)
    path = runs_dir(args) / f"probe-real-every{step}.jsonl"
    if not path.is_file():
        write_canonical(path, "qa", items[::step])
    return path


def runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs or Path(args.workspace) / "real_model")


def run_identity(run_dir: Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """What makes a finished run this study's: base model hash, finetuning config, inputs' sha256."""
    summary = json.loads((run_dir / "summary.json").read_text())
    sources = summary["protocol"]["sources"]
    return summary["base_model_hash"], summary["config"], {name: sources[name]["sha256"] for name in sorted(sources)}


def run_setting(args: argparse.Namespace, model_hash: str, method: str, lr: float) -> dict[str, Any]:
    ws = Path(args.workspace)
    key = f"{method}-{OPTIMIZER[method]}-lr{lr:g}"
    run_dir = runs_dir(args) / key
    config = FinetuneConfig(method=method, optimizer=OPTIMIZER[method], lr=lr, top_t=args.top_t, batch_size=args.batch_size,
                            steps_per_fact=args.steps_per_fact, eval_every=args.eval_every, seed=args.seed)
    t0 = time.time()
    inputs = {"stream": ws / "data" / "facts-new.jsonl", "known": ws / "data" / "facts-known.jsonl",
              "heldout": ws / "data" / "corpus-heldout.jsonl", f"forget/{PROBE}": probe_file(args)}
    identity = (model_hash, json.loads(json.dumps(config.resolved().to_dict())),
                {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in inputs.items()})
    carried = Path(args.records) / key
    if not FinetuneRunDir(run_dir).summary() and (carried / "summary.json").is_file() and run_identity(carried) == identity:
        for f in carried.iterdir():  # a finished run recorded by an earlier session of this study: the same run
            write_bytes_atomic(run_dir / f.name, f.read_bytes())
    summary = FinetuneRunDir(run_dir).summary()  # a finished run is read back, not reloaded: so check it is this one
    if summary is not None and run_identity(run_dir) != identity:
        raise SmvizError(f"{run_dir} is a finished run of another model ({summary['base_model_hash']}, this one {model_hash}), "
                         "setting or data; move it away or choose another --runs")
    summary = summary or run_finetune(
        args.model, run_dir, config, stream=ws / "data" / "facts-new.jsonl", max_facts=args.facts,
        known=ws / "data" / "facts-known.jsonl", known_facts=args.known_facts,
        heldout=ws / "data" / "corpus-heldout.jsonl", heldout_rows=args.heldout_rows, seq_len=args.seq_len,
        forget_eval={PROBE: probe_file(args)}, prompt_format="chat", device=args.device, progress=False,
    )
    timing = run_dir / "study_seconds.json"  # how long the run took when this study ran it
    if not timing.is_file():
        write_json_atomic(timing, {"seconds": round(time.time() - t0)})
    for name in RECORD_FILES:  # the run's record, committed with the results: a later session reads it back
        write_bytes_atomic(carried / name, (run_dir / name).read_bytes())
    curve = curve_of(run_dir)
    end = curve.iloc[-1]
    result = {
        "key": key, "method": method, "lr": lr, "model_hash": summary["base_model_hash"],
        "finetuned_model_hash": summary["model_hash"], "seconds": json.loads(timing.read_text())["seconds"],
        "learn_em": float(end["learn_em"]), "stream_em_max": float(curve["stream_em"].max()),
        **{c: float(end[c]) for c in COLUMNS},
        "probe_start": float(curve[PROBE_COLUMN].iloc[0]), "known_start": float(curve["known_em"].iloc[0]),
        "trainable_per_step": summary["trainable_per_step"],
        "curve": curve[["step", "stream_em", "learn_em", PROBE_COLUMN, "known_em", "heldout_nll", *COLUMNS]]
        .rename(columns={PROBE_COLUMN: "probe_contained"}).to_dict(orient="list"),
    }
    print(f"  {key:<24} learned EM {result['learn_em']:.3f}; probe drop {result['probe_drop']:+.1%}, known drop "
          f"{result['known_drop']:+.1%}, NLL {result['nll_change']:+.3f}  ({result['seconds']} s)", flush=True)
    return result


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The best learner; ties: the smaller probe drop."""
    return max(results, key=lambda r: (round(r["learn_em"], 9), -r["probe_drop"]))


def matched(chosen: dict[str, dict[str, Any]], levels: list[float]) -> list[dict[str, Any]]:
    rows = []
    for level in levels:
        for method, r in chosen.items():
            point = at_learning(pd.DataFrame(r["curve"]), level, columns=COLUMNS)
            rows.append({"method": method, "key": r["key"], "level": level, "reached": point is not None,
                         **({c: point[c] for c in ("step", *COLUMNS)} if point else {})})
    return rows


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:+.1%}"


def markdown(doc: dict[str, Any]) -> str:
    p = doc["plan"]
    lines = [f"# Sparse memory finetuning vs full finetuning vs LoRA on the retrofitted SmolLM2-135M (model {doc['model_hash']})",
             "", f"`{doc['command']}`", "",
             f"{p['facts']} new facts, {p['steps_per_fact']} steps each of {p['batch_size']} rows; sparse: top {p['top_t']} "
             f"slots by TF-IDF; probe: {doc['probe_n']} real-knowledge questions the base answers; known facts: "
             f"{p['known_facts']}; one seed ({p['seed']}). {doc['protocol_note']}", "",
             "## Every run (end of stream)", "",
             "| run | learned EM | probe drop (contained) | probe F1 drop | known-fact drop | Δ held-out NLL | trained numbers / step | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        mark = " **(chosen)**" if doc["chosen"][r["method"]] == r["key"] else ""
        trained = "—" if r["trainable_per_step"] is None else f"{r['trainable_per_step']:,.0f}"
        lines.append(f"| {r['key']}{mark} | {r['learn_em']:.3f} | {pct(r['probe_drop'])} | {pct(r['probe_f1_drop'])} | "
                     f"{pct(r['known_drop'])} | {r['nll_change']:+.3f} | {trained} | {r['seconds']} |")
    lines += ["", f"## At matched learning (stream EM {doc['matched']['level']})", "",
              "| method | step | probe drop | probe F1 drop | known-fact drop | Δ held-out NLL |", "|---|---|---|---|---|---|"]
    for row in doc["matched"]["rows"]:
        if row["level"] == doc["matched"]["level"]:
            if row["reached"]:
                lines.append(f"| {LABEL[row['method']]} ({row['key']}) | {row['step']:.0f} | {pct(row['probe_drop'])} | "
                             f"{pct(row['probe_f1_drop'])} | {pct(row['known_drop'])} | {row['nll_change']:+.3f} |")
            else:
                lines.append(f"| {LABEL[row['method']]} ({row['key']}) | not reached | | | | |")
    return "\n".join(lines) + "\n"


def figures(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in doc["runs"]:
        if doc["chosen"][r["method"]] != r["key"]:
            continue
        c = pd.DataFrame(r["curve"])
        for ax, col, title in zip(axes, ("stream_em", "probe_contained", "known_em"),
                                  ("learning: new facts EM", "real-knowledge probe (contained)", "known facts EM")):
            ax.plot(c["step"], c[col], marker="o", color=COLORS[r["method"]], label=f"{LABEL[r['method']]}, lr {r['lr']:g}")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    curves = out / "real_model_curves.png"
    write_png_atomic(curves, fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for r in doc["runs"]:
        ax.scatter(r["learn_em"], r["probe_drop"] * 100, color=COLORS[r["method"]], s=40)
        ax.annotate(f"{r['lr']:g}", (r["learn_em"], r["probe_drop"] * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for m in METHODS:
        ax.scatter([], [], color=COLORS[m], label=LABEL[m])
    ax.set_xlabel("learned EM (new facts, held-out templates)")
    ax.set_ylabel("real-knowledge probe drop (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    pareto = out / "real_model_pareto.png"
    write_png_atomic(pareto, fig)
    plt.close(fig)
    return [curves.name, pareto.name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--model", required=True, help="the retrofitted model (with slot_stats.safetensors)")
    parser.add_argument("--runs", default=None, help="run directories (default WS/real_model)")
    parser.add_argument("--records", default=str(Path(__file__).parent / "results" / "real_model_runs"),
                        help="each finished run's record (config, metrics, per-question scores, summary), committed; "
                             "a finished run of the same model, setting and data found here is read back, not rerun")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--facts", type=int, default=6)
    parser.add_argument("--steps-per-fact", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--top-t", type=int, default=500)
    parser.add_argument("--known-facts", type=int, default=30)
    parser.add_argument("--probe-questions", type=int, default=120, help="ask about this many of the probe's questions (0: all)")
    parser.add_argument("--heldout-rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    ws = Path(args.workspace)
    for path in (ws / "data" / "probe-real.jsonl", Path(args.model) / STATS_FILE):
        if not path.is_file():
            raise SmvizError(f"{path} is missing; see this script's docstring for the commands that make it")

    t0 = time.time()
    model_hash = model_dir_hash(args.model)
    runs = []
    for method in args.methods.split(","):
        print(f"{LABEL[method]}: lr {', '.join(f'{lr:g}' for lr in LRS[method])}", flush=True)
        runs += [run_setting(args, model_hash, method, lr) for lr in LRS[method]]
    methods = sorted({r["method"] for r in runs}, key=METHODS.index)
    chosen = {m: choose([r for r in runs if r["method"] == m]) for m in methods}
    reach = min(r["stream_em_max"] for r in chosen.values())
    levels = sorted({round(x, 4) for x in np.arange(0.05, max(r["stream_em_max"] for r in chosen.values()) + 1e-9, 0.05)}
                    | ({round(reach, 4)} if reach > 0 else set()))
    probe_n = sum(1 for line in probe_file(args).read_text().splitlines() if line.strip())
    doc = {
        "format": FORMAT,
        "command": "python analyses/real_model.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "model_hash": runs[0]["model_hash"],
        "plan": {k: getattr(args, k) for k in ("facts", "steps_per_fact", "batch_size", "eval_every", "top_t", "known_facts",
                                                "heldout_rows", "seq_len", "seed", "probe_questions")} | {"lrs": {m: LRS[m] for m in methods}},
        "probe_n": probe_n,
        "protocol_note": ("Questions in the chat template, greedy, decoded without special tokens; drops relative to each "
                          "run's own start; probe drop on 'contained' (an answer inside the model's sentence), F1 beside it."),
        "runs": runs,
        "chosen": {m: r["key"] for m, r in chosen.items()},
        "matched": {"level": round(reach, 4) if reach > 0 else None, "rows": matched(chosen, levels)},
        "seconds": round(time.time() - t0),
    }
    out = Path(args.out)
    doc["figures"] = figures(doc, out)
    write_json_atomic(out / "real_model.json", doc)
    write_text_atomic(out / "real_model.md", markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
