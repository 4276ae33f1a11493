"""`smviz` command line: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from smviz.errors import SmvizError


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
    from smviz.demo import DemoSettings, run_demo

    settings = DemoSettings.for_preset(args.preset, steps=args.steps, seed=args.seed)
    summary = run_demo(args.workspace, settings, device=args.device)
    if args.json:
        print(json.dumps(summary, indent=2))


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

    p = sub.add_parser(
        "demo",
        help="build a model, save and verify it, train it briefly and show what its memory does",
        description="Stages already done in the workspace are skipped; delete a model directory to redo it.",
    )
    p.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    p.add_argument("--preset", default="tiny", help=f"built-in model: {presets}")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per preset: tiny 150, micro 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data and training")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(run=_cmd_demo)
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
