"""How much a stream of plain documents teaches, against facts with Q/A lines (analyses/documents.md).

    python analyses/documents_vs_facts.py --workspace WS --model WS/models/tiny \
        --out analyses/results/documents_vs_facts.json

The new facts of the workspace world, written three ways, each learned with sparse memory finetuning,
full finetuning and LoRA for the same number of steps (--facts facts × 10 steps of 16 rows):
- `facts+qa`: the facts stream with Q/A lines of the training question templates (smviz's default);
- `facts`: the facts stream, statements only (the paper's composition);
- `bios`: the people's biographies as plain documents (`documents` format): per person --copies
  biographies, each one random statement paraphrase per relation in random order (what pretraining
  shows the model of the people it knows), one document per stream item.
Every run is measured by one QA file, the held-out questions of those facts (`--learn-eval`), so the
three streams are compared on the same questions; forgetting on the workspace's known facts and held-out
text. Writes the stream files and the QA file beside the run directories (--runs) and one JSON file.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from smviz.data.facts import read_facts
from smviz.io import json_text, write_text_atomic
from smviz.train import FinetuneConfig
from smviz.workspace.stages import run_finetune

METHODS = ("sparse", "full", "lora")


def biographies(facts, copies: int, seed: int) -> list[dict]:
    """`copies` biographies per person of `facts`: one random statement per fact, in random order."""
    rng = random.Random(seed)
    people: dict[str, list] = {}
    for f in facts:
        people.setdefault(f.subject, []).append(f)
    docs = []
    for subject, person in people.items():
        for c in range(copies):
            sentences = [rng.choice(f.statements) for f in person]
            rng.shuffle(sentences)
            docs.append({"id": f"{subject}/bio{c}", "text": " ".join(sentences)})
    rng.shuffle(docs)
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--facts", type=int, default=20, help="new facts (from the first), all of a person's facts kept together")
    p.add_argument("--copies", type=int, default=10, help="biographies per person")
    p.add_argument("--top-t", type=int, default=500, help="value rows per step of sparse finetuning")
    p.add_argument("--runs", default="/tmp/smviz-documents")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ws = Path(args.workspace)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    facts = read_facts(ws / "data" / "facts-new.jsonl")[: args.facts]
    steps = len(facts) * 10
    learn = write_jsonl(runs / "learn-qa.jsonl", [{"id": f"{f.id}/{q.template}", "question": q.text, "answer": f.answer}
                                                  for f in facts for q in f.heldout_questions])
    write_jsonl(runs / "facts.jsonl", [f.to_dict() for f in facts])
    bios = biographies(facts, args.copies, seed=0)
    write_jsonl(runs / "bios.jsonl", bios)
    if steps % len(bios):
        raise SystemExit(f"{steps} steps do not split evenly over {len(bios)} biographies; choose --copies")
    streams = {
        "facts+qa": (runs / "facts.jsonl", {"composition": "statements+qa", "steps_per_fact": 10}),
        "facts": (runs / "facts.jsonl", {"composition": "statements", "steps_per_fact": 10}),
        "bios": (runs / "bios.jsonl", {"steps_per_fact": steps // len(bios)}),
    }
    results = []
    for name, (stream, settings) in streams.items():
        for method in METHODS:
            t0 = time.time()
            config = FinetuneConfig(method=method, eval_every=10_000, top_t=args.top_t, **settings)
            s = run_finetune(args.model, runs / f"{name}-{method}", config, stream=stream, learn_eval=learn,
                             known=ws / "data" / "facts-known.jsonl", heldout=ws / "data" / "corpus-heldout.jsonl",
                             progress=False)
            m = s["metrics"]
            row = {"stream": name, "method": method, "items": s["facts"], "steps": s["steps"], **settings,
                   "learn_em_start": m["learning_em"]["start"], "learn_em": m["learning_em"]["end"],
                   "learn_f1": m["learning_f1"]["end"], "known_em_start": m["known_em"]["start"],
                   "known_em": m["known_em"]["end"], "known_drop": m["known_em"]["relative_drop"],
                   "nll_start": m["heldout_nll"]["start"], "nll": m["heldout_nll"]["end"],
                   "model_hash": s["base_model_hash"], "seconds": round(time.time() - t0)}
            print(json_text(row, indent=None), flush=True)
            results.append(row)
    out = {"protocol": s["protocol"], "facts": len(facts), "people": len({f.subject for f in facts}),
           "biographies": len(bios), "questions": sum(len(f.heldout_questions) for f in facts), "runs": results}
    write_text_atomic(args.out, json_text(out))


if __name__ == "__main__":
    main()
