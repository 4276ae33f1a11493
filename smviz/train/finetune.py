"""Continual finetuning of a memory model on a stream of facts: sparse memory finetuning (Lin et al.
2025, §4) and its ablations, full finetuning and LoRA — one interface (`finetune`), one evaluation
protocol (`evaluate_point`), one run-directory format, exact resume.

Run directory:
    config.json      the effective FinetuneConfig, base model hash, background-statistics protocol,
                     and the stream, known-fact and held-out sources (with sha256)
    metrics.jsonl    one line per evaluation (step 0 = before training, every eval_every steps, the end)
    steps.parquet    per step and memory layer: fact, loss, distinct slots read, gradient norm, the selected slots
                     with their TF, DF and ranking score (empty lists for full / LoRA)
    deltas/          sparse methods: step-NNNNNN.safetensors = the selected rows' values after that
                     step, so the memory at any step is the base model plus deltas 1..s
    checkpoints/     optional full model directories (checkpoint_every)
    state/           resume point (trainer.json, optimizer state; full / LoRA also their weights)
    model/           the finetuned model (LoRA merged), its hash in summary.json
    summary.json     start / end / change of every metric, model hashes, protocol

Choices where the paper is silent (see also paper-notes §2): the model runs in eval mode while it
trains (no dropout in the presets, normalisation statistics frozen, no usage-balancing loss), so a
sparse step changes nothing but its rows; plain SGD has no momentum and no weight decay; the loss is
the mean token cross-entropy over the whole paraphrase (end-of-text included, padding excluded);
selection is per memory layer with t rows each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
from tqdm.auto import tqdm

from smviz.data.facts import Fact
from smviz.errors import ConfigError, SmvizError
from smviz.evaluate import SCORING_PROTOCOL, answer_questions, heldout_nll, qa_metrics
from smviz.io import replace_dir, write_json_atomic
from smviz.model import MemoryModel
from smviz.stats import SlotStats, batch_counts
from smviz.train.sparse import SELECTIONS, RowAdamW, RowSelector, RowSGD, Selection
from smviz.train.state import append_metrics, flatten_optimizer, load_optimizer, truncate_metrics
from smviz.train.stream import COMPOSITIONS, FactStream

log = logging.getLogger(__name__)

RUN_FORMAT = "smviz-finetune/1"
METHODS = SELECTIONS + ("full", "lora")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_OPTIMIZER = {m: "sgd" for m in SELECTIONS} | {"full": "adamw", "lora": "adamw"}
# Learning rates from the sweep on the tiny preset (analyses/finetuning.md); the paper's are lr 2-5
# for sparse SGD and 5e-6 (full) / up to 2e-4 (LoRA) at 1.3B.
DEFAULT_LR = {("sgd", "memory"): 1000.0, ("adamw", "memory"): 0.1, ("adamw", "full"): 5e-5, ("adamw", "lora"): 3e-4,
              ("sgd", "full"): 1e-2, ("sgd", "lora"): 1e-1}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc")


@dataclass
class FinetuneConfig:
    """How a stream is learned. Every field is part of the protocol recorded with the run."""

    method: str = field(default="sparse", metadata={"help": f"one of {', '.join(METHODS)}"})
    top_t: int = field(default=500, metadata={"help": "value rows trained per step and memory layer (sparse, tf-only, random-t)"})
    optimizer: str | None = field(default=None, metadata={"help": "sgd or adamw (default: sgd for memory methods, adamw for full / lora)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: per method and optimizer, DEFAULT_LR)"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW decoupled weight decay (default 0.1); SGD has none"})
    batch_size: int = field(default=16, metadata={"help": "paraphrases of the current fact per step (the paper: 64)"})
    steps_per_fact: int = field(default=10, metadata={"help": "steps on each fact before the next arrives (the paper: ~10)"})
    composition: str = field(default="statements+qa", metadata={
        "help": "statements (the paper) or statements+qa (plus Q/A lines of training templates; the default: "
                "from statements alone the tiny model's memory learns almost nothing, analyses/finetuning.md)"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations (also the resume points)"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS, metadata={"help": "module names LoRA adapts (those present are used)"})
    checkpoint_every: int = field(default=0, metadata={"help": "steps between full model checkpoints (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of batch composition and random-t selection"})

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):  # "q_proj,v_proj" from the command line
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        self.lora_targets = tuple(self.lora_targets)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose sgd or adamw")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.top_t < 1:
            raise ConfigError(f"top_t must be >= 1, got {self.top_t}")
        for name in ("batch_size", "steps_per_fact", "eval_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")
        if self.composition not in COMPOSITIONS:
            raise ConfigError(f"unknown composition {self.composition!r}; choose one of {list(COMPOSITIONS)}")

    @property
    def sparse(self) -> bool:
        return self.method in SELECTIONS

    def resolved(self) -> FinetuneConfig:
        """The config with every default filled in (what the run records)."""
        optimizer = self.optimizer or DEFAULT_OPTIMIZER[self.method]
        family = "memory" if self.sparse else self.method
        lr = self.lr if self.lr is not None else DEFAULT_LR[(optimizer, family)]
        wd = self.weight_decay if self.weight_decay is not None else (0.1 if optimizer == "adamw" else 0.0)
        if optimizer == "sgd" and wd:
            raise ConfigError("weight decay is an AdamW setting here; SGD runs without it")
        return dataclasses.replace(self, optimizer=optimizer, lr=lr, weight_decay=wd)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown FinetuneConfig fields {unknown}")
        return cls(**d)


# --------------------------------------------------------------------------- evaluation protocol


@dataclass
class EvalSets:
    """What every evaluation asks: the stream's facts (learning: held-out question templates of the
    facts seen so far), known facts (forgetting, the NaturalQuestions analogue) and held-out corpus
    rows (forgetting, the GSM8K-NLL analogue)."""

    stream: Sequence[Fact]
    known: Sequence[Fact]
    heldout_rows: torch.Tensor
    sources: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "learning": f"held-out question templates of the stream's facts seen so far ({len(self.stream)} facts in the stream)",
            "known": f"held-out question templates of {len(self.known)} known facts",
            "heldout_nll": f"mean NLL per token of {len(self.heldout_rows)} held-out corpus rows of {self.heldout_rows.shape[1]} tokens",
            "scoring": SCORING_PROTOCOL,
            "sources": self.sources,
        }


def evaluate_point(model: MemoryModel, sets: EvalSets, seen: int) -> dict[str, Any]:
    """One evaluation: learning EM/F1 on the first `seen` stream facts (and on the whole stream),
    known-fact EM/F1, held-out NLL."""
    stream_rows = answer_questions(model, sets.stream)
    seen_ids = {f.id for f in sets.stream[:seen]}
    learned = qa_metrics([r for r in stream_rows if r["fact_id"] in seen_ids]) if seen else None
    stream = qa_metrics(stream_rows)
    known = qa_metrics(answer_questions(model, sets.known))
    return {
        "facts_seen": seen,
        "learn_em": learned["em"] if learned else None,
        "learn_f1": learned["f1"] if learned else None,
        "stream_em": stream["em"],
        "stream_f1": stream["f1"],
        "known_em": known["em"],
        "known_f1": known["f1"],
        "heldout_nll": heldout_nll(model, sets.heldout_rows)["nll"],
    }


def summarize(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """Start, end and change of each metric. Learning starts from the whole stream before training
    (nothing is seen yet) and ends on the facts seen; drops are relative to the start."""

    def rel_drop(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or a == 0 else (a - b) / a

    out = {
        "learning_em": {"start": start["stream_em"], "end": end["learn_em"]},
        "learning_f1": {"start": start["stream_f1"], "end": end["learn_f1"]},
        "known_em": {"start": start["known_em"], "end": end["known_em"]},
        "known_f1": {"start": start["known_f1"], "end": end["known_f1"]},
        "heldout_nll": {"start": start["heldout_nll"], "end": end["heldout_nll"]},
    }
    for key in ("learning_em", "learning_f1"):
        s, e = out[key]["start"], out[key]["end"]
        out[key]["gain"] = None if s is None or e is None else e - s
    for key in ("known_em", "known_f1"):
        out[key]["relative_drop"] = rel_drop(out[key]["start"], out[key]["end"])
    s, e = out["heldout_nll"]["start"], out["heldout_nll"]["end"]
    out["heldout_nll"]["change"] = e - s
    out["heldout_nll"]["relative_change"] = (e - s) / s
    return out


# --------------------------------------------------------------------------- the run


def finetune(
    model: MemoryModel,
    stream: FactStream,
    *,
    config: FinetuneConfig,
    run_dir: str | os.PathLike,
    eval_sets: EvalSets,
    stats: SlotStats | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Learn `stream` with `config.method`, evaluating on `eval_sets`; write the run directory and
    return summary.json's content. A run directory of the same run resumes from its last resume point
    (and a finished one returns its summary); one of another run is refused. `stats` (the model's
    background statistics) is required by `sparse`. `stop_after` ends after that many steps of this
    call (returns None), as an interruption would. The model is changed in place."""
    config = config.resolved()
    run_dir = Path(run_dir)
    _check_inputs(model, stream, config, stats)
    identity = {
        "format": RUN_FORMAT,
        "config": config.to_dict(),
        "base_model_hash": model.model_hash,
        "stats": None if stats is None else {"model_hash": stats.model_hash, "unit": stats.unit, "protocol": stats.protocol},
        "stream": {"facts": [f.id for f in stream.facts], "fingerprint": _facts_fingerprint(stream.facts)},
        "evaluation": eval_sets.describe(),
    }
    summary_path = run_dir / "summary.json"
    existing = _read_json(run_dir / "config.json")
    if existing is not None and existing != json.loads(json.dumps(identity)):
        raise SmvizError(f"{run_dir} holds another run (different config, model, statistics or data); choose another run directory")
    if existing is None and run_dir.exists() and any(run_dir.iterdir()):
        raise SmvizError(f"{run_dir} exists and is not a finetuning run of this configuration; choose another run directory")
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", identity)

    device = model.device
    model.eval()  # see module docstring: frozen normalisation statistics, no dropout, no aux loss
    trainer = _Trainer(model, config, stats, device)
    start = trainer.restore(run_dir)
    steps_rows = _read_steps(run_dir, start)
    metrics_path = run_dir / "metrics.jsonl"
    truncate_metrics(metrics_path, start if start else -1)  # starting over: step 0 is evaluated again below
    if start == 0:
        record = {"step": 0, **evaluate_point(model, eval_sets, 0)}
        append_metrics(metrics_path, record)

    n_steps = len(stream)
    done_now = 0
    bar = tqdm(total=n_steps, initial=start, desc=f"finetune ({config.method})", unit="step", disable=not progress)
    try:
        for step in range(start, n_steps):
            batch = {k: v.to(device) for k, v in stream.batch(step).items()}
            loss, selections, grad_norms = trainer.step(batch, step)
            fact = stream.fact(step)
            steps_rows += _step_rows(step + 1, fact.id, stream.fact_index(step), loss, selections, grad_norms)
            if config.sparse:
                trainer.write_delta(run_dir / "deltas", step + 1, selections)
            bar.set_postfix(loss=f"{loss:.3f}", selected=sum(len(s.rows) for s in selections.values()))
            bar.update()
            done, done_now = step + 1, done_now + 1
            if done % config.eval_every == 0 or done == n_steps:
                seen = stream.fact_index(step) + 1
                append_metrics(metrics_path, {"step": done, **evaluate_point(model, eval_sets, seen)})
                _write_steps(run_dir, steps_rows)
                trainer.save_state(run_dir, done)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                trainer.final_model().save_pretrained(run_dir / "checkpoints" / f"step-{done:06d}")
            if stop_after is not None and done_now >= stop_after and done < n_steps:
                return None
    finally:
        bar.close()

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    final = trainer.final_model()
    final_hash = final.save_pretrained(run_dir / "model")
    summary = {
        "format": RUN_FORMAT,
        "method": config.method,
        "base_model_hash": identity["base_model_hash"],
        "model_hash": final_hash,
        "steps": n_steps,
        "facts": len(stream.facts),
        "composition": config.composition,
        "config": config.to_dict(),
        "metrics": summarize(records[0], records[-1]),
        "trainable_per_step": trainer.trainable_per_step(),
        "optimizer_state_elements": trainer.optimizer_state_elements(),
        "protocol": eval_sets.describe(),
    }
    write_json_atomic(summary_path, summary)
    shutil.rmtree(run_dir / "state", ignore_errors=True)
    return summary


def _check_inputs(model: MemoryModel, stream: FactStream, config: FinetuneConfig, stats: SlotStats | None) -> None:
    if model.model_hash is None:
        raise SmvizError("finetune a saved model (load it with MemoryModel.from_pretrained): runs name the model hash they started from")
    n_slots = model.memory_config.n_slots
    if config.sparse and config.method != "memory-all" and config.top_t > n_slots:
        raise ConfigError(f"top_t={config.top_t} is larger than the memory ({n_slots} slots)")
    if config.sparse and model.memory_config.share_values and len(model.memory_layers) > 1:
        raise ConfigError("sparse finetuning of one value table shared by several memory layers is not supported")
    if config.method == "sparse":
        if stats is None:
            raise SmvizError("sparse finetuning ranks slots against the model's background statistics, and there are none; "
                             "compute them with `smviz stats --model MODEL_DIR`")
        stats.check_model(model)


def _facts_fingerprint(facts: Sequence[Fact]) -> str:
    text = "\n".join(json.dumps(f.to_dict(), sort_keys=True) for f in facts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- steps.parquet

STEP_SCHEMA = pa.schema([
    ("step", pa.int32()), ("fact_id", pa.string()), ("fact_index", pa.int32()), ("loss", pa.float32()),
    ("layer", pa.int16()), ("accessed", pa.int32()), ("grad_norm", pa.float32()), ("selected", pa.list_(pa.int32())),
    ("tf", pa.list_(pa.float32())), ("df", pa.list_(pa.int32())), ("score", pa.list_(pa.float32())),
])


def _step_rows(step: int, fact_id: str, fact_index: int, loss: float, selections: dict[int, Selection],
               grad_norms: dict[int, float]) -> list[dict[str, Any]]:
    rows = []
    for layer, s in selections.items():
        rows.append({
            "step": step, "fact_id": fact_id, "fact_index": fact_index, "loss": loss, "layer": layer, "accessed": s.accessed,
            "grad_norm": grad_norms[layer],
            "selected": s.rows.cpu().numpy().astype(np.int32), "tf": s.tf.cpu().numpy().astype(np.float32),
            "df": s.df.cpu().numpy().astype(np.int32), "score": s.score.cpu().numpy().astype(np.float32),
        })
    return rows


def _write_steps(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=STEP_SCHEMA)
    tmp = run_dir / f".steps.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, run_dir / "steps.parquet")


def _read_steps(run_dir: Path, upto: int) -> list[dict[str, Any]]:
    path = run_dir / "steps.parquet"
    if upto == 0 or not path.is_file():
        return []
    return [r for r in pq.read_table(path).to_pylist() if r["step"] <= upto]


# --------------------------------------------------------------------------- one method's training


class _Trainer:
    """What differs between methods: which parameters train, how a step updates them, what the
    resume state holds."""

    def __init__(self, model: MemoryModel, config: FinetuneConfig, stats: SlotStats | None, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.peft_model = None
        layers = model.memory_layers
        if config.sparse:
            for p in model.parameters():
                p.requires_grad_(False)
            self.selector = RowSelector(config.method, config.top_t, model.memory_config.n_slots, stats, device, config.seed)
            self.row_optimizers: dict[int, RowSGD | RowAdamW] = {}
            for block, layer in layers.items():
                if config.optimizer == "sgd":
                    self.row_optimizers[block] = RowSGD(config.lr)
                else:
                    table = layer.value_table.weight
                    self.row_optimizers[block] = RowAdamW(table.shape[0], table.shape[1], config.lr,
                                                          weight_decay=config.weight_decay, device=device)
            return
        if config.method == "lora":
            from peft import LoraConfig, get_peft_model

            names = {n.rsplit(".", 1)[-1] for n, m in model.lm.named_modules() if isinstance(m, torch.nn.Linear)}
            targets = [t for t in config.lora_targets if t in names]
            if not targets:
                raise ConfigError(f"none of the LoRA targets {list(config.lora_targets)} is a linear layer of this model")
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none")
            with torch.random.fork_rng(devices=[]):  # adapter initialisation is part of the run: seeded
                torch.manual_seed(config.seed)
                self.peft_model = get_peft_model(model.lm, lora)  # adapters are injected into model.lm in place
        params = [p for p in model.parameters() if p.requires_grad or config.method == "full"]
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=config.lr)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def step(self, batch: dict[str, torch.Tensor], step: int) -> tuple[float, dict[int, Selection], dict[int, float]]:
        """One update on `batch`; returns the loss and, per memory layer, what was read / selected and
        the gradient norm of what trained (sparse: that layer's selected rows; full / LoRA: all
        trainable parameters)."""
        selections: dict[int, Selection] = {}
        n_slots = self.model.memory_config.n_slots
        with ExitStack() as stack:
            trainables = {}
            for block, layer in self.model.memory_layers.items():
                if self.config.sparse:
                    trainables[block] = stack.enter_context(layer.value_table.train_rows())

                def read(layer_module, indices, weights, mask, block=block):
                    counts = batch_counts(indices, mask, n_slots)
                    if self.config.sparse:
                        chosen = self.selector.select(block, counts, step)
                        layer_module.value_table.choose_rows(chosen.rows)
                    else:  # full / LoRA: record what was read, select nothing
                        read_slots = torch.nonzero(counts).flatten()
                        empty = read_slots[:0]
                        chosen = Selection(empty, empty.double(), empty, empty.double(), accessed=len(read_slots))
                    selections[block] = chosen

                stack.callback(layer.add_access_hook(read).remove)
            loss = self.model(**batch).loss
            loss.backward()
            grad_norms: dict[int, float] = {}
            if self.config.sparse:
                for block, layer in self.model.memory_layers.items():
                    t = trainables[block]
                    grad_norms[block] = torch.linalg.vector_norm(t.delta.grad).item() if len(t.rows) else 0.0
                    if len(t.rows):
                        self.row_optimizers[block].step(layer.value_table.weight, t.rows, t.delta.grad)
        if not self.config.sparse:
            grads = [p.grad for p in self.trainable.values() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() if grads else 0.0
            grad_norms = dict.fromkeys(selections, norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), selections, grad_norms

    # ---- on disk

    def write_delta(self, directory: Path, step: int, selections: dict[int, Selection]) -> None:
        tensors = {}
        for block, s in selections.items():
            rows = torch.sort(s.rows).values
            tensors[f"rows.{block}"] = rows.cpu().contiguous()
            tensors[f"values.{block}"] = self.model.memory_layers[block].value_table.weight[rows].detach().cpu().contiguous()
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".step-{step:06d}.tmp"
        safetensors.torch.save_file(tensors, tmp)
        os.replace(tmp, directory / f"step-{step:06d}.safetensors")

    def save_state(self, run_dir: Path, step: int) -> None:
        tmp = run_dir / f".state.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        layout: dict[str, Any] = {"step": step}
        if self.config.sparse:
            tensors = {f"{block}.{k}": v for block, o in self.row_optimizers.items() for k, v in o.state_dict().items()}
            safetensors.torch.save_file(tensors, tmp / "optimizer.safetensors")
        else:
            weights = {n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}
            safetensors.torch.save_file(weights, tmp / "trainable.safetensors")
            tensors, layout["optimizer"] = flatten_optimizer(self.optimizer)
            safetensors.torch.save_file(tensors, tmp / "optimizer.safetensors")
        write_json_atomic(tmp / "trainer.json", layout)
        replace_dir(tmp, run_dir / "state")

    def restore(self, run_dir: Path) -> int:
        """Bring model and optimizer to the run's resume point; returns its step (0: a fresh run)."""
        state = run_dir / "state"
        trainer = _read_json(state / "trainer.json")
        step = trainer["step"] if trainer else 0
        deltas = run_dir / "deltas"
        if deltas.is_dir():
            for f in sorted(deltas.glob("step-*.safetensors")):
                if int(f.stem.split("-")[1]) > step:
                    f.unlink()  # written after the resume point: those steps run again
                elif self.config.sparse:
                    with torch.no_grad():
                        saved = safetensors.torch.load_file(f, device=str(self.device))
                        for block, layer in self.model.memory_layers.items():
                            layer.value_table.weight[saved[f"rows.{block}"]] = saved[f"values.{block}"].to(layer.value_table.weight.dtype)
        if not step:
            return 0
        if self.config.sparse:
            flat = safetensors.torch.load_file(state / "optimizer.safetensors")
            for block, o in self.row_optimizers.items():
                o.load_state_dict({k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(block)})
        else:
            weights = safetensors.torch.load_file(state / "trainable.safetensors", device=str(self.device))
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(weights[n])
            load_optimizer(self.optimizer, state / "optimizer.safetensors", trainer["optimizer"], self.device)
        log.info("resuming %s at step %d", run_dir, step)
        return step

    def final_model(self) -> MemoryModel:
        """The model as it stands (LoRA: a merged copy's worth — adapters folded into the weights)."""
        if self.peft_model is None:
            return self.model
        import copy

        merged = copy.deepcopy(self.model)
        for module in merged.lm.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge()
        merged.lm = _unwrap_lora(merged.lm)
        return merged

    def trainable_per_step(self) -> int | None:
        if self.config.sparse:
            v_dim = next(iter(self.model.memory_layers.values())).value_table.weight.shape[1]
            per_layer = self.config.top_t if self.config.method != "memory-all" else None
            return None if per_layer is None else per_layer * v_dim * len(self.model.memory_layers)
        return sum(p.numel() for p in self.trainable.values())

    def optimizer_state_elements(self) -> int:
        if self.config.sparse:
            return sum(o.state_elements() if isinstance(o, RowAdamW) else 0 for o in self.row_optimizers.values())
        return sum(t.numel() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def _unwrap_lora(lm: torch.nn.Module) -> torch.nn.Module:
    """Replace every (merged) LoRA layer of `lm` by its base layer."""
    for name, module in list(lm.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, module.base_layer)
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm
