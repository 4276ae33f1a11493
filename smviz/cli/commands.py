"""The `smviz` commands: each parses nothing and decides nothing — it calls the library (mostly
`smviz.workspace.stages`) with the parsed flags and prints the result."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from smviz.cli.flags import config_from_flags
from smviz.errors import ConfigError


def print_json(obj: Any, *, indent: int | None = 2) -> None:
    """Print `obj` as strict JSON (NaN and infinities as null), the one way a command prints JSON."""
    from smviz.io import json_text

    print(json_text(obj, indent=indent))


def cmd_build(args: argparse.Namespace) -> None:
    from smviz.workspace.stages import build_model_dir

    model = build_model_dir(args.preset, args.out, seed=args.seed)
    info = {"path": args.out, "preset": args.preset, "model_hash": model.model_hash, "parameters": model.parameter_counts()}
    if args.json:
        print_json(info)
    else:
        print(f"built {args.preset!r} → {args.out} (model {model.model_hash})")


def cmd_info(args: argparse.Namespace) -> None:
    from smviz.workspace.stages import model_info

    model, about = model_info(args.model)
    if args.json:
        print_json(about)
        return
    if about["memory"] is None:
        source = about["source"]
        origin = f", imported from {source['name']} ({source['kind']})" if source else ""
        print(f"{args.model}: {about['model_type']} base model, no memory{origin} (model {about['model_hash']})")
        if source and source["dequantisation"]:
            print(f"  de-quantised {source['dequantisation']}")
    else:
        print(f"{args.model}: {about['model_type']} with memory at blocks {list(model.memory_layers)} (model {model.model_hash})")
    for name, n in about["parameters"].items():
        print(f"  {name:>14}: {n:,}")
    for i, layer in getattr(model, "memory_layers", {}).items():
        print(f"  block {i}: {layer.extra_repr()}")


def cmd_import(args: argparse.Namespace) -> None:
    from smviz.model import import_model

    about = import_model(args.src, args.out, allow_online=True)
    if args.json:
        print_json(about)
        return
    source = about["source"]
    print(f"imported {source['name']} ({source['kind']}) -> {about['path']} (model {about['model_hash']})")
    print(f"  architecture: {about['model_type']}, {about['blocks']} blocks, width {about['hidden_size']}, no memory")
    print(f"  parameters: {about['parameters']:,}")
    print(f"  de-quantisation: {source['dequantisation'] or 'none (float32 already)'}")
    for name, digest in source["files"].items():
        print(f"  source sha256: {digest}  {name}")
    print("  give it a memory with MemoryModel.attach (smviz.model.load_base_model reads it)")


def cmd_demo(args: argparse.Namespace) -> None:
    from smviz.workspace.stages import run_demo, run_real_demo

    if args.model is not None:
        result = run_real_demo(args.workspace, src=args.model, device=args.device, steps=args.steps, seed=args.seed, say=print)
    else:
        result = run_demo(args.workspace, preset=args.preset, device=args.device, steps=args.steps, seed=args.seed, say=print)
    if args.json:
        print_json(result)
    if args.no_app:
        print(f"browse it with: smviz app --workspace {args.workspace}")
        return
    from smviz.serve import serve_app

    print(f"serving the app for {args.workspace} (Ctrl-C stops it)")
    serve_app(args.workspace, port=args.port)


def cmd_world(args: argparse.Namespace) -> None:
    from smviz.data.world import WorldConfig
    from smviz.workspace.stages import build_data

    config = WorldConfig(seed=args.seed, n_known=args.n_known, n_bio_only=args.n_bio_only, n_new=args.n_new)
    wrote = build_data(args.out, config, force=args.force)
    print(f"{'wrote' if wrote else 'already present:'} fact world and corpus splits in {args.out}")


def cmd_record(args: argparse.Namespace) -> None:
    from smviz.distributed import distributed_from_env
    from smviz.model import MemoryModel
    from smviz.record import read_documents, record_texts

    documents, source = read_documents(args.input)  # bad input fails here, before anything is loaded or written
    with distributed_from_env(args.device) as (rank, world_size, device):
        model = MemoryModel.from_pretrained(args.model, device=device)
        trace = record_texts(
            model, documents, args.out, source=source, layers=args.layers, context=args.context, stride=args.stride,
            batch_size=args.batch_size, force=args.force, rank=rank, world_size=world_size, summary=args.summary,
            summary_only=args.summary_only,
            **({} if args.max_doc_chars is None else {"max_doc_chars": args.max_doc_chars}),
            **({} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}),
        )
    if rank != 0:
        return
    info = {"path": str(trace.path), "model_hash": trace.model_hash, "documents": trace.n_docs,
            "tokens": trace.n_tokens, "accesses": trace.n_accesses, "layers": trace.layers,
            "summary": trace.meta.get("summary")}
    if args.json:
        print_json(info)
    else:
        summary = trace.meta.get("summary")
        kept = (f"per-slot summaries of {summary['reads']:,} reads (top and sample {summary['keep']})"
                + ("" if summary["only"] else f", {trace.n_accesses:,} accesses") if summary else f"{trace.n_accesses:,} accesses")
        print(f"recorded {trace.n_docs:,} documents, {trace.n_tokens:,} tokens, {kept} → {trace.path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from smviz.distributed import distributed_from_env
    from smviz.train import FinetuneConfig
    from smviz.workspace import Workspace
    from smviz.workspace.stages import parse_probes, run_finetune

    ws = Workspace(args.workspace)
    config = config_from_flags(FinetuneConfig(), args, args.config_flags, args.set)

    def existing(path: Any) -> Any:  # a workspace default that is there
        return path if path.is_file() else None

    with distributed_from_env(args.device) as (rank, world_size, device):  # under torchrun: one update, rank 0 writes
        summary = run_finetune(
            args.model, args.out, config, stream=args.stream or ws.facts("new"), stream_format=args.stream_format,
            known=args.known or existing(ws.facts("known")), heldout=args.heldout or existing(ws.corpus("heldout")),
            learn_eval=args.learn_eval, forget_eval=parse_probes(args.forget_eval), prompt_format=args.prompt_format,
            max_facts=args.max_facts, first_fact=args.first_fact, background=args.background, known_facts=args.known_facts,
            heldout_rows=args.heldout_rows, device=device, rank=rank, world_size=world_size,
        )
    if rank != 0:
        return
    if args.json:
        print_json(summary)
        return
    from smviz.data.formats import KIND_NOUNS

    print(f"{summary['method']}: {summary['facts']} {KIND_NOUNS[summary['stream']['kind']]}, {summary['steps']} steps -> {args.out} "
          f"(model {summary['model_hash']})")
    for line in summary_lines(summary["metrics"]):
        print(f"  {line}")


def summary_lines(m: dict[str, Any]) -> list[str]:
    """A run's metrics, one line each, for what was measured."""

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    lines = []
    if m["learning_em"]["end"] is not None:
        lines.append(f"learning EM  {num(m['learning_em']['start'])} -> {num(m['learning_em']['end'])}")
    for name, e in m.get("editing", {}).items():
        lines.append(f"{name:<20} {num(e['start'])} -> {num(e['end'])}")
    if m["known_em"]["start"] is not None:
        drop = m["known_em"]["relative_drop"]
        lines.append(f"known EM     {num(m['known_em']['start'])} -> {num(m['known_em']['end'])} "
                     f"(relative drop {'—' if drop is None else f'{drop:.1%}'})")
    for name, probe in m.get("forget", {}).items():
        e = probe["em"]
        lines.append(f"{name} EM {num(e['start'])} -> {num(e['end'])}")
    if m["heldout_nll"]["start"] is not None:
        lines.append(f"held-out NLL {num(m['heldout_nll']['start'])} -> {num(m['heldout_nll']['end'])}")
    return lines


def cmd_pretrain(args: argparse.Namespace) -> None:
    from smviz.config import parse_assignments
    from smviz.device import resolve_device
    from smviz.evaluate import format_report
    from smviz.train.pretrain import PretrainConfig
    from smviz.workspace import Workspace
    from smviz.workspace.stages import evaluate_pretrained, run_pretraining

    overrides = parse_assignments(args.set)
    dicts = sorted({"memory", "model"} & set(overrides))
    if dicts:
        raise ConfigError(f"set {', '.join(dicts)} with --{' and --'.join(dicts)} KEY=VALUE, not --set")
    config = config_from_flags(PretrainConfig(), args, args.config_flags, args.set)
    config = dataclasses.replace(config, memory=parse_assignments(args.memory), model=parse_assignments(args.model_override))
    ws = Workspace(args.workspace)
    model = run_pretraining(ws, args.name, config, device=resolve_device(args.device))
    result = evaluate_pretrained(ws, args.name, model)
    if args.json:
        print_json(result)
    else:
        print(format_report(result))


def cmd_retrofit(args: argparse.Namespace) -> None:
    from smviz.config import parse_assignments
    from smviz.device import resolve_device
    from smviz.train.pretrain import RetrofitConfig
    from smviz.train.recipes import retrofit_recipe
    from smviz.workspace import Workspace
    from smviz.workspace.stages import format_run_evaluation, last_run_evaluation, run_retrofit

    fixed = sorted({"base", "memory", "model", "preset"} & set(parse_assignments(args.set)))
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot be set with --set: use --base, --layers and --memory KEY=VALUE")
    memory: dict[str, Any] = parse_assignments(args.memory)
    if args.layers is not None:
        if "layers" in memory:
            raise ConfigError("memory blocks given twice: use --layers or --memory layers=..., not both")
        memory["layers"] = args.layers
    start = retrofit_recipe(args.recipe, args.base) if args.recipe else RetrofitConfig(base=args.base)
    config = config_from_flags(start, args, args.config_flags, args.set)
    config = dataclasses.replace(config, memory=start.memory | memory)
    ws = Workspace(args.workspace)
    model = run_retrofit(ws, args.name, config, device=resolve_device(args.device))
    record = last_run_evaluation(ws, args.name)
    if args.json:
        print_json(record)
        return
    print(f"retrofitted {args.base} -> {ws.model(args.name)} (model {model.model_hash}; memory at blocks "
          f"{list(model.memory_layers)}; run state and metrics in {ws.pretrain_run(args.name)})")
    if record is not None:
        print(format_run_evaluation(record))


def cmd_eval(args: argparse.Namespace) -> None:
    from smviz.device import resolve_device
    from smviz.evaluate import format_report
    from smviz.workspace import Workspace
    from smviz.workspace.stages import evaluate_model_dir

    result = evaluate_model_dir(Workspace(args.workspace), args.model, device=resolve_device(args.device), out=args.out)
    if args.json:
        print_json(result)
    else:
        print(format_report(result))


def cmd_stats(args: argparse.Namespace) -> None:
    from smviz.distributed import distributed_from_env
    from smviz.stats import format_usage
    from smviz.workspace.stages import background_stats, stats_path

    with distributed_from_env(args.device) as (rank, world_size, device):
        stats = background_stats(
            args.workspace, args.model, unit=args.unit, n_batches=args.batches, batch_size=args.batch_size,
            seq_len=args.seq_len, device=device, out=args.out, rank=rank, world_size=world_size, mixture=args.mixture,
        )
    if rank != 0:
        return
    out = str(stats_path(args.model, args.out))
    if args.json:
        print_json({"path": out, "model_hash": stats.model_hash, "unit": stats.unit, "n_docs": stats.n_docs,
                     "n_tokens": stats.n_tokens, "protocol": stats.protocol,
                     "usage": {str(block): m for block, m in stats.usage().items()}})
    else:
        print(f"wrote {out}\n{format_usage(stats)}")


def cmd_report(args: argparse.Namespace) -> None:
    from smviz.workspace.stages import make_report

    if args.report == "diff":
        inputs = dict(before_dir=args.before, after_dir=args.after, facts_path=args.facts, known_path=args.known,
                      heldout_path=args.heldout, run_dir=args.run_dir, top_slots=args.top_slots,
                      prompt_format=args.prompt_format)
    else:
        inputs = dict(run_dirs=args.runs)
    doc, js = make_report(args.report, args.out, args.format, **inputs)
    if args.json:
        print_json({"report": str(doc), "json": str(js)}, indent=None)
    else:
        print(f"wrote {doc} and {js}")


def cmd_data_convert(args: argparse.Namespace) -> None:
    from smviz.data.formats import read_data
    from smviz.data.formats.canonical import write_canonical

    fmt, records = read_data(args.input, args.format)  # bad input fails here, before anything is written
    labelled = None
    if args.label_entities:
        if fmt.kind != "facts":
            raise ConfigError(f"--label-entities labels the entities of facts, and {args.input} holds {fmt.kind} ({fmt.name})")
        from smviz.analysis.entities import load_pipeline
        from smviz.analysis.entity_labels import describe_counts, label_entities

        records, counts = label_entities(records, load_pipeline(args.spacy_model))
        labelled = describe_counts(counts)
    write_canonical(args.out, fmt.kind, records)
    noun = "record" if len(records) == 1 else "records"
    print(f"{args.input}: format {fmt.name} ({fmt.kind}), {len(records):,} {noun} -> {args.out}")
    if labelled:
        print(labelled)


def cmd_data_probe(args: argparse.Namespace) -> None:
    from smviz.device import resolve_device
    from smviz.evaluate.probe import REAL_KNOWLEDGE, REAL_KNOWLEDGE_SOURCE, answering_model, build_probe, write_probe
    from smviz.workspace.stages.finetune import read_qa, source

    builtin = args.input == "real-knowledge"
    path = REAL_KNOWLEDGE if builtin else Path(args.input)
    items = read_qa(path, "smviz data probe")  # bad input fails here, before the model loads or anything is written
    model = answering_model(args.model, device=resolve_device(args.device))
    kept, provenance = build_probe(model, items, prompt_format=args.prompt_format)
    side = write_probe(args.out, kept, provenance, source=source(path) | ({"description": REAL_KNOWLEDGE_SOURCE} if builtin else {}))
    print(f"{args.input}: the model ({model.model_hash}) answers {len(kept)} of {len(items)} questions correctly "
          f"({args.prompt_format} prompts) -> {args.out} (provenance: {side})")


def cmd_app(args: argparse.Namespace) -> None:
    from smviz.serve import serve_app

    raise SystemExit(serve_app(args.workspace, port=args.port, host=args.host, announce=not args.no_browser))
