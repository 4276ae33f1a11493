"""`smviz demo`: build a memory model from a preset, save and verify it, and show the memory at work —
slot usage, a short training run on a lookup-table task, accuracy with the memory on and off,
generation. Stages whose output is already in the workspace are skipped, so a re-run costs seconds.

Later stages of the project (fact world, corpus, finetuning, analyses, app) join this pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from smviz.data.synthetic import AssociationTask
from smviz.device import resolve_device, seed_everything
from smviz.errors import ModelFileError
from smviz.model import MemoryModel, preset, verify_model_dir
from smviz.usage import UsageMonitor
from smviz.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """What the demo builds and trains; defaults per preset come from `for_preset`."""

    preset: str = "tiny"
    steps: int = 150
    batch_size: int = 16
    pairs_per_sequence: int = 32
    n_pairs: int = 2048
    lr: float = 2e-3
    seed: int = 0
    eval_batches: int = 4

    @classmethod
    def for_preset(cls, name: str, **overrides: Any) -> DemoSettings:
        preset(name)  # validates the name
        base = cls(preset=name)
        if name.startswith("micro"):
            base = cls(preset=name, steps=200, batch_size=16, pairs_per_sequence=16, n_pairs=256, lr=5e-3)
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})


def run_demo(
    workspace: str | os.PathLike,
    settings: DemoSettings,
    *,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo stages into `workspace`; returns the summary also written to reports/demo-<preset>.json."""
    ws = Workspace(workspace)
    dev = resolve_device(device)
    seed_everything(settings.seed)
    s = settings
    summary: dict[str, Any] = {"settings": asdict(s), "device": str(dev)}

    # 1. the freshly initialised model, saved and verified
    init_dir = ws.model(f"{s.preset}-init")
    t0 = time.perf_counter()
    if not _is_valid_model(init_dir):
        MemoryModel.from_preset(s.preset, seed=s.seed).save_pretrained(init_dir)
        say(f"[1/5] built preset {s.preset!r} → {init_dir} ({time.perf_counter() - t0:.1f}s)")
    else:
        say(f"[1/5] {init_dir} already built and verified — skipped")
    model = MemoryModel.from_pretrained(init_dir, device=dev)
    counts = model.parameter_counts()
    summary["init_model"] = {"path": str(init_dir), "model_hash": model.model_hash, "parameters": counts}
    say(
        f"      model {model.model_hash}: {counts['total']:,} parameters — memory values {counts['memory_values']:,}, "
        f"memory keys/projections {counts['memory_other']:,}, dense {counts['dense']:,}"
    )
    for i, layer in model.memory_layers.items():
        say(f"      block {i}: {layer.extra_repr()}")

    task = AssociationTask(model.config.vocab_size, min(s.n_pairs, model.config.vocab_size), seed=s.seed)
    eval_batches = [
        {k: v.to(dev) for k, v in task.batch(s.batch_size, s.pairs_per_sequence, torch.Generator().manual_seed(10_000 + b)).items()}
        for b in range(s.eval_batches)
    ]

    # 2. usage at initialisation
    summary["init_eval"] = _evaluate(model, task, eval_batches)
    say("[2/5] at initialisation: " + _describe(summary["init_eval"]))

    # 3. a short training run on the lookup table
    trained_dir = ws.model(f"{s.preset}-assoc")
    if not _is_valid_model(trained_dir):
        say(f"[3/5] training {s.steps} steps on {task.n_pairs} key→value associations (batch {s.batch_size}×{2 * s.pairs_per_sequence} tokens)")
        summary["training"] = _train(model, task, s, dev)
        model.save_pretrained(trained_dir)
        say(f"      {summary['training']['tokens_per_s']:.0f} tokens/s, final loss {summary['training']['final_loss']:.3f} → {trained_dir}")
    else:
        say(f"[3/5] {trained_dir} already trained and verified — skipped")
    model = MemoryModel.from_pretrained(trained_dir, device=dev)
    summary["trained_model"] = {"path": str(trained_dir), "model_hash": model.model_hash}

    # 4. what the memory contributes now
    summary["trained_eval"] = _evaluate(model, task, eval_batches)
    say("[4/5] after training:      " + _describe(summary["trained_eval"]))

    # 5. generation: the next token after "k1 v1 k2" should be v2
    prompt = eval_batches[0]["input_ids"][:4, :3]
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
    expected = eval_batches[0]["input_ids"][:4, 3]
    hits = int((generated[:, -1] == expected).sum())
    summary["generate"] = {"prompts": prompt.tolist(), "generated": generated[:, -1].tolist(), "expected": expected.tolist()}
    say(f"[5/5] generate(): 'k1 v1 k2' → v2 correct for {hits} of {len(prompt)} prompts")

    out = ws.reports / f"demo-{s.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out)
    say(f"summary → {out}")
    return summary


def _is_valid_model(directory: Path) -> bool:
    if not directory.exists():
        return False
    try:
        verify_model_dir(directory)
    except ModelFileError as e:
        raise ModelFileError(f"{e}. Delete {directory} to rebuild it.") from None
    return True


def _train(model: MemoryModel, task: AssociationTask, s: DemoSettings, dev: torch.device) -> dict[str, Any]:
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(s.lr, weight_decay=0.0))
    generator = torch.Generator().manual_seed(s.seed)
    tokens, losses = 0, []
    start = time.perf_counter()
    for _ in (bar := tqdm(range(s.steps), desc="train", unit="step", mininterval=1.0)):
        batch = {k: v.to(dev) for k, v in task.batch(s.batch_size, s.pairs_per_sequence, generator).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    seconds = time.perf_counter() - start
    return {"steps": s.steps, "seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": losses[-1], "losses": losses}


@torch.no_grad()
def _evaluate(model: MemoryModel, task: AssociationTask, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Value accuracy and loss with the memory on and off, and slot usage over the batches."""
    model.eval()
    result: dict[str, Any] = {}
    with UsageMonitor(model) as usage:
        on = [model(**b) for b in batches]
    with model.memory_off():
        off = [model(**b) for b in batches]
    for name, outs in (("memory_on", on), ("memory_off", off)):
        result[name] = {
            "loss": sum(o.loss.item() for o in outs) / len(outs),
            "accuracy": sum(task.value_accuracy(o.logits, b) for o, b in zip(outs, batches)) / len(outs),
        }
    result["usage"] = {str(i): m for i, m in usage.metrics().items()}
    return result


def _describe(e: dict[str, Any]) -> str:
    usage = "; ".join(
        f"block {i}: {m['used_share']:.1%} of {int(m['slots']):,} slots read, Gini {m['gini']:.2f}, "
        f"{int(m['slots_90']):,} slots hold 90% of reads"
        for i, m in e["usage"].items()
    )
    return (
        f"accuracy {e['memory_on']['accuracy']:.3f} (memory off: {e['memory_off']['accuracy']:.3f}), "
        f"loss {e['memory_on']['loss']:.3f} (off: {e['memory_off']['loss']:.3f}); {usage}"
    )
