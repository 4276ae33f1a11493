"""Continual finetuning of a memory model on a stream (facts, documents, QA lines or editing records):
`finetune` runs any registered method (sparse memory finetuning, Lin et al. 2025, §4, and its
ablations, full finetuning, LoRA) over a `Stream` with one `Trainer`, evaluates with one protocol
(`smviz.evaluate.protocol`) and writes one run-directory format (`smviz.train.rundir`), with exact resume.

The model runs in eval mode while it trains (no dropout in the presets, normalisation statistics
frozen, no usage-balancing loss), so a value-row step changes nothing but its rows. A loss that turns
non-finite stops the run with a RunError and no summary.json (the run is not finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from smviz.data.formats.canonical import canonical_dict
from smviz.distributed import barrier
from smviz.errors import ConfigError, RunError
from smviz.evaluate.protocol import EvalSets, score_point, summarize
from smviz.io import json_text
from smviz.model import MemoryModel
from smviz.stats import SlotStats
from smviz.train.config import FinetuneConfig
from smviz.train.rundir import OPTIMIZER, RUN_FORMAT, TRAINABLE, FinetuneRunDir
from smviz.train.selection import Selection
from smviz.train.stream import Stream
from smviz.train.trainer import Trainer

log = logging.getLogger(__name__)

def finetune(
    model: MemoryModel,
    stream: Stream,
    *,
    config: FinetuneConfig,
    run_dir: str | os.PathLike,
    eval_sets: EvalSets,
    stats: SlotStats | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any] | None:
    """Learn `stream` with `config.method`, evaluating on `eval_sets`; write the run directory and
    return summary.json's content. A run directory of the same run resumes from its last resume point
    (and a finished one returns its summary); one of another run is refused. `stats` (the model's
    background statistics) is required by methods that rank against them (sparse, kl). `stop_after`
    ends after that many steps of this call (returns None), as an interruption would. The model is
    changed in place.

    Under torchrun (`rank` of `world_size`, torch.distributed initialised) every process takes rows
    rank, rank + world_size, … of each batch and `Trainer` sums what must be summed, so all hold the
    same model after every step; rank 0 alone evaluates and writes the run directory (the others
    wait for it at the next step), and every process returns the summary."""
    config = config.resolved()
    run = FinetuneRunDir(run_dir)
    check_inputs(model, config, stats)
    identity = {
        "format": RUN_FORMAT,
        "config": config.to_dict(),
        "base_model_hash": model.model_hash,
        "stats": None if stats is None else {"model_hash": stats.model_hash, "unit": stats.unit, "protocol": stats.protocol},
        "stream": {**stream.describe(), "ids": [item.id for item in stream.items], "fingerprint": items_fingerprint(stream)},
        "evaluation": eval_sets.describe(),
    }
    existing = run.identity()
    if existing is not None and existing != json.loads(json_text(identity, indent=None)):  # as written to disk
        raise RunError(f"{run.path} holds another run (different config, model, statistics or data); choose another run directory")
    if existing is None and run.holds_files():
        raise RunError(f"{run.path} exists and is not a finetuning run of this configuration; choose another run directory")
    summary = run.summary()
    if summary is not None:
        return summary
    if world_size > 1 and config.batch_size < world_size:
        raise RunError(f"batch_size {config.batch_size} is smaller than the {world_size} processes; each needs rows")
    barrier(world_size)  # every process has checked the directory before rank 0 writes into it
    writes = rank == 0
    if writes:
        run.write_identity(identity)
        run.write_stream([canonical_dict(stream.kind, item) for item in stream.items])

    device = model.device
    model.eval()  # see module docstring: frozen normalisation statistics, no dropout, no aux loss
    trainer = Trainer(model, config, stats, device, world_size=world_size)
    start = restore(trainer, run)
    steps_rows = run.steps(start)
    if writes:
        run.truncate_metrics(start if start else -1)  # starting over: step 0 is evaluated again below
        run.truncate_questions(start if start else -1)

    def evaluate(step: int, seen: int) -> None:
        if not writes:
            return
        metrics, questions = score_point(model, eval_sets, seen)
        run.append_metrics({"step": step, **metrics})
        run.append_questions({"step": step, **questions})

    if start == 0:
        evaluate(0, 0)

    n_steps = len(stream)
    done_now = 0
    bar = tqdm(total=n_steps, initial=start, desc=f"finetune ({config.method})", unit="step", disable=not progress or not writes)
    try:
        for step in range(start, n_steps):
            batch = {k: v[rank::world_size].to(device) for k, v in stream.batch(step).items()}
            loss, selections, grad_norms = trainer.step(batch, step)
            steps_rows += step_rows(step + 1, stream.item(step).id, stream.item_index(step), loss, selections, grad_norms)
            if trainer.trains_rows and writes:
                run.write_delta(step + 1, trainer.delta(selections))
            bar.set_postfix(loss=f"{loss:.3f}", selected=sum(len(s.rows) for s in selections.values()))
            bar.update()
            done, done_now = step + 1, done_now + 1
            if writes and (done % config.eval_every == 0 or done == n_steps):
                seen = stream.item_index(step) + 1
                evaluate(done, seen)
                run.write_steps(steps_rows)
                layout, tensors = trainer.state()
                run.save_state({"step": done, **layout}, tensors)
            if writes and config.checkpoint_every and done % config.checkpoint_every == 0:
                trainer.final_model().save_pretrained(run.checkpoint_dir(done))
            if stop_after is not None and done_now >= stop_after and done < n_steps:
                barrier(world_size)  # rank 0's resume point is on disk before anyone leaves
                return None
    finally:
        bar.close()

    if not writes:
        barrier(world_size)  # rank 0 saves the model and the summary
        return run.summary()
    records = run.metrics()
    final_hash = trainer.final_model().save_pretrained(run.model_dir)
    summary = {
        "format": RUN_FORMAT,
        "method": config.method,
        "base_model_hash": identity["base_model_hash"],
        "model_hash": final_hash,
        "steps": n_steps,
        "facts": len(stream.items),  # stream items (facts, documents, QA lines or editing records)
        "stream": stream.describe(),
        "composition": config.composition,
        "config": config.to_dict(),
        "metrics": summarize(records[0], records[-1]),
        "trainable_per_step": trainer.trainable_per_step(),
        "optimizer_state_elements": trainer.optimizer_state_elements(),
        "protocol": eval_sets.describe(),
    }
    run.write_summary(summary)
    barrier(world_size)
    return summary


def restore(trainer: Trainer, run: FinetuneRunDir) -> int:
    """Bring the trainer's model and optimizer to the run's resume point; returns its step (0: a fresh
    run). Deltas written after the resume point are deleted (those steps run again)."""
    layout = run.state()
    step = layout["step"] if layout else 0
    run.drop_deltas_after(step)
    if trainer.trains_rows:
        for s in run.delta_steps():
            trainer.apply_delta(run.delta(s, trainer.device))
    if not step:
        return 0
    names = (OPTIMIZER,) if trainer.trains_rows else (OPTIMIZER, TRAINABLE)
    trainer.load_state(layout, {name: run.state_tensors(name) for name in names})
    log.info("resuming %s at step %d", run.path, step)
    return step


def check_inputs(model: MemoryModel, config: FinetuneConfig, stats: SlotStats | None) -> None:
    """Refuse what a run of `config` on `model` cannot do, before anything is written."""
    if model.model_hash is None:
        raise RunError("finetune a saved model (load it with MemoryModel.from_pretrained): runs name the model hash they started from")
    spec = config.spec
    if config.sparse or spec.uses_top_t or spec.needs_stats:
        model.require_memory(f"{config.method} finetuning")
    if config.freeze_memory or config.value_lr_mult != 1:
        model.require_memory("full finetuning with freeze_memory or value_lr_mult")
    n_slots = model.memory_config.n_slots
    if spec.uses_top_t and config.top_t > n_slots:
        raise ConfigError(f"top_t={config.top_t} is larger than the memory ({n_slots} slots)")
    if config.sparse and model.memory_config.share_values and len(model.memory_layers) > 1:
        raise ConfigError("sparse finetuning of one value table shared by several memory layers is not supported")
    if spec.needs_stats:
        if stats is None:
            raise RunError(f"{config.method} finetuning ranks slots against the model's background statistics, and there "
                           "are none; compute them with `smviz stats --model MODEL_DIR`")
        stats.check_model(model)


def items_fingerprint(stream: Stream) -> str:
    """A hash of the stream's items, in their canonical form."""
    text = "\n".join(json.dumps(canonical_dict(stream.kind, item), sort_keys=True) for item in stream.items)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_rows(step: int, fact_id: str, fact_index: int, loss: float, selections: dict[int, Selection],
              grad_norms: dict[int, float]) -> list[dict[str, Any]]:
    """The steps.parquet rows of one step, one per memory layer (`smviz.train.rundir.STEP_SCHEMA`)."""
    rows = []
    for layer, s in selections.items():
        rows.append({
            "step": step, "fact_id": fact_id, "fact_index": fact_index, "loss": loss, "layer": layer, "accessed": s.accessed,
            "grad_norm": grad_norms[layer],
            "selected": s.rows.cpu().numpy().astype(np.int32), "tf": s.tf.cpu().numpy().astype(np.float32),
            "df": s.df.cpu().numpy().astype(np.int32), "score": s.score.cpu().numpy().astype(np.float32),
        })
    return rows
