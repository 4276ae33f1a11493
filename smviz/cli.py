"""`smviz` command line: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from smviz.errors import SmvizError
from smviz.io import write_json_atomic


def _cmd_build(args: argparse.Namespace) -> None:
    from smviz.model import MemoryModel

    model = MemoryModel.from_preset(args.preset, seed=args.seed)
    model_hash = model.save_pretrained(args.out)
    info = {"path": args.out, "preset": args.preset, "model_hash": model_hash, "parameters": model.parameter_counts()}
    print(json.dumps(info, indent=2) if args.json else f"built {args.preset!r} → {args.out} (model {model_hash})")


def _cmd_info(args: argparse.Namespace) -> None:
    from smviz.model import MemoryModel

    model = MemoryModel.from_pretrained(args.model)
    info = {
        "path": args.model,
        "model_hash": model.model_hash,
        "model_type": model.config.model_type,
        "memory": model.memory_config.to_dict(),
        "parameters": model.parameter_counts(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.model}: {info['model_type']} with memory at blocks {list(model.memory_layers)} (model {model.model_hash})")
    for name, n in info["parameters"].items():
        print(f"  {name:>14}: {n:,}")
    for i, layer in model.memory_layers.items():
        print(f"  block {i}: {layer.extra_repr()}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from smviz.demo import run_demo

    result = run_demo(args.workspace, preset=args.preset, device=args.device, steps=args.steps, seed=args.seed,
                      app=not args.no_app, port=args.port)
    if args.json:
        print(json.dumps(result, indent=2))


def _cmd_world(args: argparse.Namespace) -> None:
    from smviz.data.world import WorldConfig
    from smviz.errors import WriteError
    from smviz.pipeline import build_data

    config = WorldConfig(seed=args.seed, n_known=args.known, n_bio_only=args.bio_only, n_new=args.new)
    try:
        wrote = build_data(args.out, config, force=args.force)
    except WriteError as e:
        raise WriteError(str(e).replace("pass force=True", "pass --force")) from None
    print(f"{'wrote' if wrote else 'already present:'} fact world and corpus splits in {args.out}")


def _cmd_record(args: argparse.Namespace) -> None:
    from smviz.device import resolve_device
    from smviz.model import MemoryModel
    from smviz.record import read_documents, record_texts

    documents, source = read_documents(args.input)  # bad input fails here, before anything is loaded or written
    model = MemoryModel.from_pretrained(args.model, device=resolve_device(args.device))
    trace = record_texts(
        model, documents, args.out, source=source, layers=args.layers, context=args.context, stride=args.stride,
        batch_size=args.batch_size, force=args.force,
    )
    info = {"path": str(trace.path), "model_hash": trace.model_hash, "documents": trace.n_docs,
            "tokens": trace.n_tokens, "accesses": trace.n_accesses, "layers": trace.layers}
    print(json.dumps(info, indent=2) if args.json else
          f"recorded {trace.n_docs:,} documents, {trace.n_tokens:,} tokens, {trace.n_accesses:,} accesses → {trace.path}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from smviz.device import resolve_device
    from smviz.pipeline import run_finetune
    from smviz.train import FinetuneConfig
    from smviz.workspace import Workspace

    ws = Workspace(args.workspace)
    given = dict(method=args.method, top_t=args.top_t, optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size,
                 steps_per_fact=args.steps_per_fact, composition=args.composition, eval_every=args.eval_every, seed=args.seed)
    # flags left out take FinetuneConfig's defaults (the one place they are defined)
    config = FinetuneConfig.from_dict({k: v for k, v in given.items() if v is not None} | _parse_overrides(args.set))
    summary = run_finetune(
        args.model, args.out, config, facts=args.facts or ws.data / "facts-new.jsonl",
        known=args.known or ws.data / "facts-known.jsonl", heldout=args.heldout or ws.data / "corpus-heldout.jsonl",
        max_facts=args.max_facts, first_fact=args.first_fact, background=args.background,
        known_facts=args.known_facts, heldout_rows=args.heldout_rows, device=resolve_device(args.device),
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    m = summary["metrics"]
    print(f"{summary['method']}: {summary['facts']} facts, {summary['steps']} steps -> {args.out} (model {summary['model_hash']})")
    print(f"  learning EM  {m['learning_em']['start']:.3f} -> {m['learning_em']['end']:.3f}")
    print(f"  known EM     {m['known_em']['start']:.3f} -> {m['known_em']['end']:.3f} (relative drop {m['known_em']['relative_drop'] or 0:.1%})")
    print(f"  held-out NLL {m['heldout_nll']['start']:.3f} -> {m['heldout_nll']['end']:.3f}")


def _parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE pairs, values parsed as JSON when they parse (numbers, true/false, lists), else strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SmvizError(f"expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from smviz.device import resolve_device
    from smviz.pipeline import evaluate_workspace_model, run_pretraining
    from smviz.evaluate import format_report
    from smviz.train.pretrain import PretrainConfig
    from smviz.workspace import Workspace

    fields = {"preset": args.preset, "steps": args.steps, "seed": args.seed}
    fields = {k: v for k, v in fields.items() if v is not None} | _parse_overrides(args.set)
    fields["memory"] = _parse_overrides(args.memory)
    fields["model"] = _parse_overrides(args.model_override)
    config = PretrainConfig.from_dict(fields)
    ws = Workspace(args.workspace)
    model = run_pretraining(ws, args.name, config, device=resolve_device(args.device))
    result = evaluate_workspace_model(ws, model)
    write_json_atomic(ws.pretrain_run(args.name) / "eval.json", result)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def _cmd_eval(args: argparse.Namespace) -> None:
    from smviz.device import resolve_device
    from smviz.evaluate import format_report
    from smviz.model import MemoryModel
    from smviz.pipeline import evaluate_workspace_model
    from smviz.workspace import Workspace

    model = MemoryModel.from_pretrained(args.model, device=resolve_device(args.device))
    result = evaluate_workspace_model(Workspace(args.workspace), model)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def _cmd_stats(args: argparse.Namespace) -> None:
    from pathlib import Path

    from smviz.stats import STATS_FILE, background_stats, distributed_from_env, format_usage

    with distributed_from_env(args.device) as (rank, world_size, device):
        stats = background_stats(
            args.workspace, args.model, unit=args.unit, n_batches=args.batches, batch_size=args.batch_size,
            seq_len=args.seq_len, device=device, out=args.out, rank=rank, world_size=world_size,
        )
    if rank != 0:
        return
    out = args.out or str(Path(args.model) / STATS_FILE)
    if args.json:
        info = {"path": out, "model_hash": stats.model_hash, "unit": stats.unit, "n_docs": stats.n_docs,
                "n_tokens": stats.n_tokens, "protocol": stats.protocol,
                "usage": {str(block): m for block, m in stats.usage().items()}}
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out}\n{format_usage(stats)}")


def _cmd_report(args: argparse.Namespace) -> None:
    from smviz.report import build_diff_report, build_run_report, check_out_dir, output_paths, render_html, render_md, write_report

    output_paths(args.out, args.format)  # bad --out / --format fail before any work
    check_out_dir(args.out)
    if args.report == "diff":
        report = build_diff_report(args.before, args.after, args.facts, args.known, heldout_path=args.heldout,
                                   run_dir=args.run_dir, top_slots=args.top_slots)
    else:
        report = build_run_report(args.runs)
    document = render_html(report) if args.format == "html" else render_md(report)
    doc, js = write_report(report, document, args.out, args.format)
    print(json.dumps({"report": str(doc), "json": str(js)}) if args.json else f"wrote {doc} and {js}")


def _cmd_app(args: argparse.Namespace) -> None:
    from smviz.serve import serve_app

    raise SystemExit(serve_app(args.workspace, port=args.port, host=args.host, announce=not args.no_browser))


def build_parser() -> argparse.ArgumentParser:
    from smviz.model import PRESETS

    presets = ", ".join(f"{name} ({p.description})" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="smviz", description="Build, record, finetune and explain memory-layer language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="build a freshly initialised model from a preset and save it")
    p.add_argument("--preset", default="tiny", help=f"built-in model: {presets}")
    p.add_argument("--out", required=True, help="model directory to write (replaced only if it is an smviz model)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=_cmd_build)

    p = sub.add_parser("info", help="verify a model directory and describe it")
    p.add_argument("model", help="model directory written by smviz")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("world", help="write the fact world and the background corpus splits")
    p.add_argument("--out", required=True, help="data directory, e.g. WS/data")
    p.add_argument("--seed", type=int, default=0, help="world and corpus-split seed")
    p.add_argument("--known", type=int, default=150, help="people in pretraining as statements and Q/A")
    p.add_argument("--bio-only", type=int, default=100, help="people in pretraining as statements only")
    p.add_argument("--new", type=int, default=100, help="people never seen in pretraining (the stream)")
    p.add_argument("--force", action="store_true", help="replace a different world already in --out")
    p.set_defaults(run=_cmd_world)

    p = sub.add_parser("pretrain", help="pretrain a model from scratch on the workspace's corpus and world, then evaluate it")
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ holds the world (smviz world)")
    p.add_argument("--name", default="tiny", help="model name: run state in WS/pretrain/NAME, model in WS/models/NAME")
    p.add_argument("--preset", default=None, help="model preset (default tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation and data order")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other PretrainConfig fields, e.g. lr=1e-3 fact_share=0.5")
    p.add_argument("--memory", nargs="*", default=[], metavar="KEY=VALUE", help="MemoryConfig overrides, e.g. value_lr_mult=10 mode=parallel")
    p.add_argument("--model", dest="model_override", nargs="*", default=[], metavar="KEY=VALUE", help="HF config overrides, e.g. intermediate_size=512")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    p.set_defaults(run=_cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate a model on the workspace's facts and held-out corpus, memory on and off")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ holds the world")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser(
        "record",
        help="record which memory slots every token of a text file reads, into a trace",
        description="Documents longer than --context are read in windows --stride tokens apart; every token is "
        "recorded once. An interrupted recording resumes when the same command is run again.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--input", required=True, help="JSONL file: one {\"text\": ..., \"id\": ...} per line, or a facts file (statements and Q/A)")
    p.add_argument("--out", required=True, help="trace directory to write, e.g. WS/traces/NAME")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="memory blocks to record (default: all)")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default 128, capped by the model)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default context/2)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--force", action="store_true", help="replace an existing trace at --out")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=_cmd_record)

    p = sub.add_parser(
        "stats",
        help="count background slot accesses and document frequencies of a model (for TF-IDF ranking)",
        description=(
            "Runs the model on random batches of its own pretraining mixture (corpus train split + world texts "
            "of known and bio-only people; never held-out text or new facts) and writes per-slot access counts and "
            "document frequencies beside its weights (the model hash does not change). Resumes an interrupted run. "
            "Under torchrun (e.g. `torchrun --nproc-per-node 2 -m smviz stats ...`) the batches are split over the "
            "processes and the result is identical to one process."
        ),
    )
    p.add_argument("--model", required=True, help="model directory (e.g. WS/models/NAME)")
    p.add_argument("--workspace", default=None,
                   help="workspace whose data/ and pretrain/NAME/config.json define the mixture "
                        "(default: the workspace holding --model when it is WS/models/NAME, else ./workspace)")
    p.add_argument("--unit", default="batch", choices=["batch", "sequence"],
                   help="what a document is: batch (default, the paper: one background batch) or sequence (one row)")
    p.add_argument("--batches", type=int, default=1000, help="background batches to run (default 1000, as the paper)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the batch size of the model's pretraining run, else 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: the sequence length of the model's pretraining run, else 128)")
    p.add_argument("--out", default=None, help="output file (default MODEL_DIR/slot_stats.safetensors)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the usage summary")
    p.set_defaults(run=_cmd_stats)

    from smviz.train import FinetuneConfig, method_names

    p = sub.add_parser(
        "finetune",
        help="learn a stream of new facts with sparse memory finetuning, an ablation, full finetuning or LoRA",
        description="Facts arrive one at a time: each step trains on --batch-size paraphrases of one fact, "
        "--steps-per-fact steps per fact. Learning (held-out questions of the facts seen) and forgetting "
        "(known facts, held-out NLL) are evaluated at the start, every --eval-every steps and at the end. "
        "An interrupted run resumes when the same command is run again.",
    )
    p.add_argument("--model", required=True, help="model directory (sparse needs its slot_stats.safetensors: smviz stats)")
    p.add_argument("--out", required=True, help="run directory, e.g. WS/runs/NAME")
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ gives the default --facts, --known, --heldout")
    d = FinetuneConfig()
    p.add_argument("--method", default=None, help=f"one of {', '.join(method_names())} (default {d.method})")
    p.add_argument("--top-t", type=int, default=None, help=f"value rows trained per step (sparse, tf-only, random-t; default {d.top_t})")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="default: sgd for memory methods, adamw for full and lora")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per method and optimizer: smviz.train.get_method(METHOD).default_lr)")
    p.add_argument("--batch-size", type=int, default=None, help=f"paraphrases of the current fact per step (default {d.batch_size})")
    p.add_argument("--steps-per-fact", type=int, default=None, help=f"steps on each fact before the next one (default {d.steps_per_fact})")
    p.add_argument("--composition", default=None, help=f"statements (the paper) or statements+qa (default {d.composition})")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between evaluations (default {d.eval_every})")
    p.add_argument("--facts", default=None, help="the stream's facts (default WS/data/facts-new.jsonl)")
    p.add_argument("--max-facts", type=int, default=None, help="use N facts of --facts (from --first-fact on)")
    p.add_argument("--first-fact", type=int, default=0, help="number of the stream's first fact in --facts (default 0)")
    p.add_argument("--background", default="pretraining", choices=["pretraining", "stream"],
                   help="what sparse ranks slots against: the model's slot_stats.safetensors (default) or the stream's own batches")
    p.add_argument("--known", default=None, help="known facts for forgetting (default WS/data/facts-known.jsonl)")
    p.add_argument("--known-facts", type=int, default=100, help="how many known facts are asked")
    p.add_argument("--heldout", default=None, help="held-out corpus for NLL (default WS/data/corpus-heldout.jsonl)")
    p.add_argument("--heldout-rows", type=int, default=64, help="rows of 128 tokens of held-out text")
    p.add_argument("--seed", type=int, default=None, help="seed of batch composition, LoRA initialisation and random-t (default 0)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other FinetuneConfig fields, e.g. lora_rank=16 weight_decay=0")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print summary.json")
    p.set_defaults(run=_cmd_finetune)

    p = sub.add_parser(
        "demo",
        help="build the default workspace end to end (world, model, statistics, a trace, three finetuning streams) and serve the app",
        description="Stages already done in the workspace are skipped; interrupted stages resume. The app is served "
        "on 127.0.0.1 at the end unless --no-app.",
    )
    p.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    p.add_argument("--preset", default="tiny", help="tiny (the default model, ~22 min on 2 CPU cores) or micro (1-2 minutes)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's pretraining steps")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--no-app", action="store_true", help="do not serve the app at the end (for scripts)")
    p.add_argument("--port", type=int, default=8501, help="port of the app at the end (127.0.0.1)")
    p.add_argument("--json", action="store_true", help="also print the evaluation and the streams' summaries as JSON")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("report", help="self-contained HTML (or Markdown) + JSON reports of a checkpoint diff or finetuning runs")
    rsub = p.add_subparsers(dest="report", required=True, metavar="REPORT")
    for name, help_ in (("diff", "compare two checkpoints of one model on new facts, known facts and their memory"),
                        ("run", "learning/forgetting curves and selected-slot dynamics of one or more finetuning runs")):
        r = rsub.add_parser(name, help=help_)
        if name == "diff":
            r.add_argument("--before", required=True, help="model directory before the update")
            r.add_argument("--after", required=True, help="model directory after the update (e.g. WS/runs/NAME/model)")
            r.add_argument("--facts", required=True, help="the new facts (JSONL): learning, per-fact table, probe set")
            r.add_argument("--known", required=True, help="known facts (JSONL): forgetting")
            r.add_argument("--heldout", default=None, help="held-out corpus (JSONL) for NLL before/after (optional)")
            r.add_argument("--run", dest="run_dir", default=None, help="the finetuning run that made --after, for the audit "
                                                      "(default: the parent of --after when it is a run of --before)")
            r.add_argument("--top-slots", type=int, default=5, help="changed slots shown with contexts (default 5)")
        else:
            r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories; several: side by side")
        r.add_argument("--out", required=True, help="report file, e.g. report.html (report.json is written beside it)")
        r.add_argument("--format", default="html", choices=["html", "md"], help="html (default, self-contained) or md")
        r.add_argument("--json", action="store_true", help="print the written paths as JSON")
        r.set_defaults(run=_cmd_report)

    p = sub.add_parser("app", help="browse a workspace in the Streamlit app (local only unless --host says otherwise)")
    p.add_argument("--workspace", default="workspace", help="workspace directory to browse (default: ./workspace)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else exposes the app, with a warning)")
    p.add_argument("--no-browser", action="store_true", help="do not print the URL to open (the server is always headless)")
    p.set_defaults(run=_cmd_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except SmvizError as e:
        print(f"smviz {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
