"""The small finetuning sweep behind the defaults of `smviz finetune` (analyses/finetuning.md).

    python analyses/finetune_sweep.py --workspace WS --model WS/models/tiny --grid GRID.json --tag g1 \
        --out analyses/results/finetune_sweep.jsonl

Each grid entry is a dict of FinetuneConfig fields; every run learns the first 20 new facts of the
workspace (evaluation: the first 100 known facts, 64 held-out rows), evaluated at the start and the end,
and appends one JSON line: the settings, learning EM/F1 at the end, known-fact EM and its relative drop,
held-out NLL start and end, seconds. Run directories go to --runs (default /tmp/smviz-sweep).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smviz.io import append_jsonl, json_text
from smviz.train import FinetuneConfig
from smviz.workspace.stages import run_finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--grid", required=True, help="JSON list of FinetuneConfig field dicts (a file or inline JSON)")
    p.add_argument("--tag", default="run")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--runs", default="/tmp/smviz-sweep")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    grid = json.loads(Path(args.grid).read_text() if Path(args.grid).is_file() else args.grid)
    data = Path(args.workspace) / "data"
    for spec in grid:
        name = args.tag + "-" + "-".join(f"{k}{v}" for k, v in spec.items())
        t0 = time.time()
        config = FinetuneConfig(eval_every=10_000, **spec)
        s = run_finetune(args.model, Path(args.runs) / name, config, stream=data / "facts-new.jsonl", known=data / "facts-known.jsonl",
                         heldout=data / "corpus-heldout.jsonl", max_facts=args.facts, progress=False)
        m = s["metrics"]
        row = {"name": name, **spec, "learn_em": m["learning_em"]["end"], "learn_f1": m["learning_f1"]["end"],
               "known_em_start": m["known_em"]["start"], "known_em": m["known_em"]["end"], "known_drop": m["known_em"]["relative_drop"],
               "nll_start": m["heldout_nll"]["start"], "nll": m["heldout_nll"]["end"], "seconds": round(time.time() - t0)}
        print(json_text(row, indent=None), flush=True)
        append_jsonl(args.out, [row])


if __name__ == "__main__":
    main()
