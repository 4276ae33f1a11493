"""Issue 16's thresholds for a retrofitted model, measured against its base (Done 2): slot usage ≥ 25 %,
held-out NLL ≤ the base's + 2 %, the real-knowledge probe ≥ 95 % of the base's, the world's known facts
at EM ≥ 0.5 on held-out templates, and zeroing the memory at least halving that EM.

    python analyses/retrofit_thresholds.py --workspace WS --model WS/models/r3

The base is the one the retrofit started from (WS/pretrain/NAME/config.json). The probe is built from
the base first if WS/data/probe-real.jsonl does not exist (`smviz data probe real-knowledge`: the
questions the base answers correctly, chat template). Every known fact of the world is asked (held-out
and training templates), memory on and off; with a parallel memory and a frozen base, memory off is
the base model exactly. Usage and NLL are over held-out corpus rows of the retrofit's sequence length.
Writes analyses/results/retrofit_thresholds-NAME.{json,md} (--out), naming both model hashes and the protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from smviz.evaluate import answer_qa_items, answer_questions, memory_health, memory_usage, qa_metrics
from smviz.evaluate.probe import REAL_KNOWLEDGE, REAL_KNOWLEDGE_SOURCE, answering_model, build_probe, write_probe
from smviz.io import write_json_atomic, write_text_atomic
from smviz.model import MemoryModel
from smviz.workspace import Workspace
from smviz.workspace.stages import heldout_rows, load_data
from smviz.workspace.stages.finetune import read_qa, source

FORMAT = "smviz-retrofit-thresholds/1"
PROBE_FILE = "probe-real.jsonl"


def ensure_probe(ws: Workspace, base_dir: Path, device: str) -> Path:
    """WS/data/probe-real.jsonl: the real-knowledge questions the base answers correctly."""
    path = ws.data / PROBE_FILE
    if not path.is_file():
        t0 = time.time()
        items = read_qa(REAL_KNOWLEDGE, "the real-knowledge set")
        kept, provenance = build_probe(answering_model(base_dir, device=device), items, prompt_format="chat")
        write_probe(path, kept, provenance, source=source(REAL_KNOWLEDGE) | {"description": REAL_KNOWLEDGE_SOURCE})
        print(f"probe: the base answers {len(kept)} of {len(items)} real-knowledge questions ({time.time() - t0:.0f} s)", flush=True)
    return path


def probe_scores(model: MemoryModel, items) -> dict[str, Any]:
    m = qa_metrics(answer_qa_items(model, items, prompt_format="chat"))
    return {k: m[k] for k in ("contained", "f1", "em", "n")}


def measure(model: MemoryModel, ws: Workspace, probe, rows: torch.Tensor) -> dict[str, Any]:
    data = load_data(ws.data)
    known = data.facts()["known"]
    out: dict[str, Any] = {}
    for label, ctx in (("memory_on", contextlib.nullcontext), ("memory_off", model.memory_off)):
        with ctx():
            held = qa_metrics(answer_questions(model, known, heldout=True, prompt_format="chat"))
            train = qa_metrics(answer_questions(model, known, heldout=False, prompt_format="chat"))
            out[label] = {"known_heldout": {k: held[k] for k in ("em", "f1", "n")},
                          "known_training": {k: train[k] for k in ("em", "f1", "n")},
                          "probe": probe_scores(model, probe)}
    health = memory_health(model, rows)
    out["nll"] = {"memory_on": health["nll_memory_on"], "base": health["nll_memory_off"], "tokens": health["tokens"],
                  "protocol": health["protocol"]}
    out["usage"] = memory_usage(model, rows)["blocks"]
    out["health"] = health["blocks"]
    return out


def checks(m: dict[str, Any]) -> list[dict[str, Any]]:
    on, off = m["memory_on"], m["memory_off"]
    usage = min(b["used_share"] for b in m["usage"].values())
    em_on, em_off = on["known_heldout"]["em"], off["known_heldout"]["em"]
    probe_ratio = on["probe"]["contained"] / off["probe"]["contained"] if off["probe"]["contained"] else None
    nll_ratio = m["nll"]["memory_on"] / m["nll"]["base"]
    return [
        {"check": "slot usage (held-out rows, least-used block)", "value": usage, "threshold": ">= 0.25", "ok": usage >= 0.25},
        {"check": "held-out NLL / base NLL", "value": nll_ratio, "threshold": "<= 1.02", "ok": nll_ratio <= 1.02},
        {"check": "real-knowledge probe (contained) / base", "value": probe_ratio, "threshold": ">= 0.95",
         "ok": probe_ratio is not None and probe_ratio >= 0.95},
        {"check": "known-fact EM, held-out templates", "value": em_on, "threshold": ">= 0.5", "ok": em_on >= 0.5},
        {"check": "known-fact EM with the memory zeroed / with it", "value": em_off / em_on if em_on else None,
         "threshold": "<= 0.5", "ok": bool(em_on) and em_off <= em_on / 2},
    ]


def markdown(doc: dict[str, Any]) -> str:
    m = doc["measured"]
    lines = [f"# Retrofit thresholds: {doc['model']['name']} (model {doc['model']['hash']}, base {doc['base']['hash']})", "",
             f"`{doc['command']}`", "", "| check | value | threshold | holds |", "|---|---|---|---|"]
    for c in doc["checks"]:
        v = "—" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"| {c['check']} | {v} | {c['threshold']} | {'yes' if c['ok'] else '**no**'} |")
    lines += ["", "| | memory on | memory off (the base) |", "|---|---|---|"]
    for key, label in (("known_heldout", "known-fact EM, held-out templates"), ("known_training", "known-fact EM, training templates")):
        lines.append(f"| {label} ({m['memory_on'][key]['n']} questions) | {m['memory_on'][key]['em']:.3f} | {m['memory_off'][key]['em']:.3f} |")
    for metric in ("contained", "f1", "em"):
        lines.append(f"| real-knowledge probe {metric} ({m['memory_on']['probe']['n']} questions) | "
                     f"{m['memory_on']['probe'][metric]:.3f} | {m['memory_off']['probe'][metric]:.3f} |")
    lines.append(f"| held-out NLL ({m['nll']['tokens']:,} tokens) | {m['nll']['memory_on']:.4f} | {m['nll']['base']:.4f} |")
    lines += ["", f"Probe: {doc['probe']['kept']} of {doc['probe']['asked']} real-knowledge questions kept (those the base "
              "answers correctly with its chat template). " + doc["protocol"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--model", required=True, help="the retrofitted model, WS/models/NAME")
    parser.add_argument("--heldout-rows", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    ws, model_dir = Workspace(args.workspace), Path(args.model)
    run_config = json.loads((ws.pretrain_run(model_dir.name) / "config.json").read_text())["config"]
    base_dir = Path(run_config["base"])
    probe_path = ensure_probe(ws, base_dir, args.device)
    probe = read_qa(probe_path, "the probe")
    provenance = json.loads(probe_path.with_name(probe_path.stem + ".provenance.json").read_text())

    t0 = time.time()
    model = MemoryModel.from_pretrained(model_dir, device=args.device)
    rows = heldout_rows(load_data(ws.data), model.tokenizer, run_config["seq_len"])[: args.heldout_rows]
    measured = measure(model, ws, probe, rows)
    doc = {
        "format": FORMAT,
        "command": "python analyses/retrofit_thresholds.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": {"name": model_dir.name, "hash": model.model_hash, "retrofit": run_config},
        "base": {"path": str(base_dir), "hash": provenance["model_hash"]},
        "probe": {"file": PROBE_FILE, "asked": provenance["asked"], "kept": provenance["kept"], "source": provenance["source"]},
        "measured": measured,
        "checks": checks(measured),
        "protocol": ("Questions in the chat template, greedy, decoded without special tokens; known facts: every "
                     "known fact of the world, EM (SQuAD normalisation); probe: contained (one of the answers in the "
                     "answer), F1 and EM. Memory off: the memory's term removed, the base model exactly (parallel "
                     f"memory, frozen base). NLL and usage over {len(rows)} held-out corpus rows of {rows.shape[1]} tokens."),
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    write_json_atomic(out / f"retrofit_thresholds-{model_dir.name}.json", doc)
    write_text_atomic(out / f"retrofit_thresholds-{model_dir.name}.md", markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
