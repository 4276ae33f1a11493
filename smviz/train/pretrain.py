"""Pretraining a memory model on the background corpus plus the fact world: from scratch
(`PretrainConfig`, every knob documented) or from a pretrained base model (`RetrofitConfig`: a retrofit,
the base's LM given memory layers), and `pretrain(...)`, the one loop for both (AdamW, warmup + cosine,
slot usage and periodic evaluation logged to metrics.jsonl, checkpoint and exact resume).

Run directory (`Workspace.pretrain_run(name)`, read and written by `smviz.train.rundir.PretrainRunDir`):
config.json, metrics.jsonl, checkpoint/ (model directory + optimizer state). The finished model is
saved to `Workspace.model(name)`. Everything is a function of the config and the step, so a run that is
interrupted and resumed ends bit-identical to one that was not.

Levers against memory collapse and for putting the facts into the memory (see memory-usage notes):
the MemoryConfig knobs (`memory` overrides), dense-model shape (`model` overrides), the data mix
(`fact_share`), and a dense phase: for the first `dense_phase_steps` steps the memory output is off
and the data is corpus only, so the dense model learns language first; after it, dense parameters
train at `dense_lr_mult` × lr (also without a dense phase; 0 freezes them, leaving the world to the memory).

A retrofit (`RetrofitConfig`) starts from a base model directory (`smviz import`): the model is
`MemoryModel.attach(base LM, MemoryConfig)` (parallel mode unless `memory` says otherwise, so it starts
as the base exactly), its memory initialised from `seed`, and the base is frozen (its parameters take no
gradient and have no optimizer state) unless `dense_lr_mult` > 0 unfreezes it at that multiplier. With
`distill` > 0 the rows that are not the world's (corpus and replay) are trained to keep the base's whole
next-token distribution (`distillation_loss`) rather than to predict their text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from smviz.config import from_dict, with_overrides
from smviz.data.prompts import get_prompt_format
from smviz.errors import ConfigError
from smviz.evaluate import memory_usage
from smviz.memory import MemoryConfig
from smviz.model import MemoryModel, architecture_of, load_base_model, module_at, preset
from smviz.train.data import PretrainStream
from smviz.train.distill import check_distill, distillation_loss
from smviz.train.rundir import PretrainRunDir
from smviz.train.state import flatten_optimizer, load_optimizer
from smviz.usage import UsageMonitor

log = logging.getLogger(__name__)

@dataclass
class PretrainConfig:
    """How a model is pretrained. Every field is part of the protocol recorded with the run."""

    preset: str = field(default="tiny", metadata={"help": "model preset to build (smviz.model.PRESETS)"})
    memory: dict[str, Any] = field(default_factory=dict, metadata={"help": "MemoryConfig overrides"})
    model: dict[str, Any] = field(default_factory=dict, metadata={"help": "HF config overrides (e.g. intermediate_size)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training row"})
    batch_size: int = field(default=16, metadata={"help": "rows per step"})
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of dense parameters"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine schedule floor, as a share of lr"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0: off)"})
    fact_share: float = field(default=0.5, metadata={"help": "share of each batch's rows drawn from world texts"})
    world_copies: int = field(default=16, metadata={"help": "biographies (and Q/A documents) per person"})
    dense_phase_steps: int = field(default=0, metadata={"help": "first steps with the memory off, on corpus only"})
    dense_phase_fact_share: float = field(default=0.0, metadata={"help": "fact share during the dense phase"})
    dense_lr_mult: float = field(
        default=1.0, metadata={"help": "lr multiplier of dense parameters while the memory is on (0 freezes them)"}
    )
    eval_every: int = field(default=250, metadata={"help": "steps between evaluations (0: only at the end)"})
    eval_facts: int = field(default=100, metadata={"help": "facts per population asked at periodic evaluations"})
    usage_rows: int = field(default=64, metadata={"help": "held-out rows over which periodic usage is counted"})
    log_every: int = field(default=25, metadata={"help": "steps between training-log lines"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})

    prompt_format: ClassVar[str] = "qa"
    """How Q/A texts are written and questions asked: a preset learns the fact world's own format; a
    retrofit chooses (RetrofitConfig.prompt_format)."""

    def __post_init__(self) -> None:
        self._check_model_source()
        for name in ("seq_len", "batch_size", "steps", "world_copies"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PretrainConfig.{name} must be >= 1")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "dense_lr_mult"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"PretrainConfig.{name} must be a finite number >= 0, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"PretrainConfig.lr must be > 0, got {self.lr}")
        for name in ("memory", "model"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"PretrainConfig.{name} must be an object of overrides, got {getattr(self, name)!r}")
        if not (0 <= self.fact_share <= 1 and 0 <= self.dense_phase_fact_share <= 1):
            raise ConfigError("fact shares must lie in [0, 1]")
        if self.dense_phase_steps >= self.steps:
            raise ConfigError("dense_phase_steps must be smaller than steps")
        if self.checkpoint_every % self.log_every:
            # a resumed run then starts a fresh usage window exactly where the old one ended
            raise ConfigError("checkpoint_every must be a multiple of log_every")

    def _check_model_source(self) -> None:
        preset(self.preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """A config from a dict (a run's config.json, a recipe, flags): every value checked against its
        field's type, unknown keys ignored with a warning. `memory` and `model` are objects of overrides,
        checked where they are used (MemoryConfig, the HF config)."""
        if not isinstance(d, dict):
            raise ConfigError(f"PretrainConfig must be a JSON object, got {type(d).__name__}")
        overrides = {k: d[k] for k in ("memory", "model") if k in d}
        for name, value in overrides.items():
            if not isinstance(value, dict):
                raise ConfigError(f"PretrainConfig.{name} must be an object of overrides, got {value!r}")
        config = from_dict(cls, {k: v for k, v in d.items() if k not in overrides})
        return dataclasses.replace(config, **overrides) if overrides else config


@dataclass
class RetrofitConfig(PretrainConfig):
    """Pretraining that starts from a base model (a retrofit): the same loop and knobs as PretrainConfig,
    defaults for short fact-sized rows on a CPU (facts are 15-30 tokens), the base frozen by default."""

    preset: str = field(default="", metadata={"help": "not used: a retrofit's model is its base (left empty)"})
    model: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "not used: a retrofit keeps the base's architecture (left empty)"}
    )
    memory: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "MemoryConfig overrides (defaults: MemoryConfig's, with mode parallel and layers "
                          "[the block at two thirds of the base's depth])"},
    )
    seq_len: int = field(
        default=96,
        metadata={"help": "tokens per training row; documents are never split, longer ones are cut (SmolLM2's tokenizer: "
                          "a biography of the default world is 46-89 tokens, a chat Q/A pair 40-50)"},
    )
    batch_size: int = field(default=16, metadata={"help": "rows per step"})
    lr: float = field(
        default=1e-3,
        metadata={"help": "peak AdamW learning rate of the memory (values and keys at their MemoryConfig multipliers)"},
    )
    dense_lr_mult: float = field(
        default=0.0,
        metadata={"help": "lr multiplier of the base model's parameters: 0 freezes them (no gradients, no optimizer "
                          "state); > 0 trains them too, at that multiple of lr"},
    )
    base: str = field(default="", metadata={"help": "base model directory (smviz import): the LM and tokenizer to start from"})
    prompt_format: str = field(
        default="qa",
        metadata={"help": "how Q/A documents are written and facts asked: qa, completion or chat (the base "
                          "tokenizer's chat template, for chat-tuned models); one document per Q/A pair except qa"},
    )
    replay: int = field(
        default=0,
        metadata={"help": "self-distillation replay: this many questions about corpus articles ('Where is TITLE located?') "
                          "are asked of the base model before training, and its own answers are trained on beside "
                          "the world's documents, so that the memory learns the world without changing how the "
                          "base answers everything else (0: none)"},
    )
    replay_share: float = field(
        default=0.0,
        metadata={"help": "share of each batch's rows drawn from the replay, beside fact_share's world rows (0: the "
                          "replay documents join the world's pool and share its fact_share)"},
    )
    distill: float = field(
        default=0.0,
        metadata={"help": "weight of distillation on the batch's rows that are not world rows (corpus and replay): "
                          "there the loss is the KL divergence from the base's whole next-token distribution (a "
                          "second, memory-off forward pass, no gradient) times this weight, instead of the text's "
                          "cross-entropy, so the memory learns to leave the base's predictions alone off the world "
                          "(0: cross-entropy on every row; needs the base frozen)"},
    )

    def _check_model_source(self) -> None:
        if self.replay < 0:
            raise ConfigError(f"replay must be >= 0, got {self.replay}")
        if self.replay_share and not self.replay:
            raise ConfigError("replay_share > 0 needs a replay (replay > 0)")
        if not (0 <= self.replay_share and self.fact_share + self.replay_share <= 1 + 1e-9):
            raise ConfigError(f"replay_share must lie in [0, 1 - fact_share], got {self.replay_share} "
                              f"(fact_share {self.fact_share})")
        check_distill(self.distill, self.dense_lr_mult, self.fact_share)
        if not self.base:
            raise ConfigError("RetrofitConfig.base must name a base model directory (written by smviz import)")
        if self.preset or self.model:
            raise ConfigError("a retrofit's model is its base: RetrofitConfig.preset and .model must be left empty")
        if self.dense_phase_steps:
            raise ConfigError("a retrofit has no dense phase: the base has learned its language (dense_phase_steps must be 0)")
        get_prompt_format(self.prompt_format)


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at the last step (restarting warmup
    after the dense phase, when the memory and the world come in)."""
    start = config.dense_phase_steps if step >= config.dense_phase_steps else 0
    end = config.steps if step >= config.dense_phase_steps else config.dense_phase_steps
    local = step - start
    if local < config.warmup_steps:
        return (local + 1) / config.warmup_steps
    progress = (local - config.warmup_steps) / max(1, end - start - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(config: PretrainConfig, tokenizer) -> MemoryModel:
    """The model a run starts from: the preset, freshly initialised from the seed with `tokenizer`'s
    vocabulary, or for a retrofit the base with its memory attached (`attach_memory`; its own tokenizer)."""
    if isinstance(config, RetrofitConfig):
        return attach_memory(config)
    # The end-of-text token is also the tokenizer's pad token, but it is a real token of packed text:
    # the HF config gets no pad_token_id, which would freeze its embedding row (nn.Embedding padding_idx).
    special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None}
    model = MemoryModel.from_preset(
        config.preset, seed=config.seed, vocab_size=len(tokenizer), hf_overrides=special | config.model, **config.memory
    )
    model.tokenizer = tokenizer
    return model


def retrofit_memory_config(overrides: dict[str, Any], n_blocks: int) -> MemoryConfig:
    """The MemoryConfig of a retrofit: MemoryConfig's defaults with mode parallel and the block at two
    thirds of the depth (20 of 30), then `overrides` (strings parsed to their field's type); ConfigError
    naming a bad field or a block index the model does not have."""
    defaults = MemoryConfig(mode="parallel", layers=(2 * n_blocks // 3,))
    memory = with_overrides(defaults, overrides)
    bad = [i for i in memory.layers if i >= n_blocks]
    if bad:
        raise ConfigError(f"memory layer index {bad} out of range: the base model has {n_blocks} blocks (0..{n_blocks - 1})")
    return memory


def attach_memory(config: RetrofitConfig) -> MemoryModel:
    """The base model of `config` (verified; a model that already has a memory is refused) with memory
    layers attached, on the CPU. The memory is initialised from `config.seed` alone, so the same config
    always starts from the same memory: a resumed run re-creates the initial values exactly."""
    lm, tokenizer, _ = load_base_model(config.base)
    n_blocks = len(module_at(lm, architecture_of(lm.config).blocks))
    memory = retrofit_memory_config(config.memory, n_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MemoryModel.attach(lm, memory, tokenizer)


def _frozen_base(config: PretrainConfig) -> bool:
    return isinstance(config, RetrofitConfig) and config.dense_lr_mult == 0


def _in_dense_phase(step: int, config: PretrainConfig) -> bool:
    return step < config.dense_phase_steps


def _set_lrs(optimizer: torch.optim.Optimizer, step: int, config: PretrainConfig) -> None:
    factor = lr_factor(step, config)
    memory_on = not _in_dense_phase(step, config)
    for group in optimizer.param_groups:
        mult = config.dense_lr_mult if memory_on and group["name"].startswith("dense") else 1.0
        group["lr"] = group["base_lr"] * factor * mult


def pretrain(
    run_dir: Path,
    config: PretrainConfig,
    *,
    tokenizer,
    stream: PretrainStream,
    evaluate: Callable[[MemoryModel], dict[str, Any]] | None = None,
    usage_rows: torch.Tensor | None = None,
    device: torch.device = torch.device("cpu"),
    stop_after: int | None = None,
    progress: bool = True,
) -> MemoryModel:
    """Train (or resume) the run in `run_dir` to `config.steps`; returns the trained model. `tokenizer`
    sizes a preset's vocabulary; a retrofit's model brings its base's tokenizer (`build_model`).

    `evaluate(model)` is called every `eval_every` steps and at the end; its dict goes to
    metrics.jsonl. `usage_rows` are held-out rows for the periodic usage count. `stop_after` ends
    the call after that many steps of this call (with a checkpoint), as an interruption would.
    """
    run = PretrainRunDir(run_dir)
    run.claim(config.to_dict())  # a run directory belongs to one config: another is refused, changing nothing

    trainer = run.checkpoint()
    if trainer is not None:
        model = MemoryModel.from_pretrained(run.checkpoint_model_dir, device=device)
        optimizer = make_optimizer(model, config)
        load_optimizer(optimizer, run.checkpoint_optimizer(), trainer["optimizer"], device)
        start = trainer["step"]
        run.truncate_metrics(start)
        log.info("resuming %s at step %d", run.path, start)
    else:
        model = build_model(config, tokenizer).to(device)
        optimizer = make_optimizer(model, config)
        start = 0
        run.clear_metrics()

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    model.train()
    desc = "retrofit" if isinstance(config, RetrofitConfig) else "pretrain"
    bar = tqdm(range(start, end), desc=desc, unit="step", disable=not progress, mininterval=2.0, initial=start, total=config.steps)
    window_tokens, window_start = 0, time.perf_counter()
    with UsageMonitor(model) as train_usage:
        for step in bar:
            dense_phase = _in_dense_phase(step, config)
            batch = stream.batch(step, config.dense_phase_fact_share if dense_phase else None)
            batch = {k: v.to(device) for k, v in batch.items()}
            _set_lrs(optimizer, step, config)
            if dense_phase:
                with model.memory_off():
                    loss = model(**batch).loss
            elif getattr(config, "distill", 0):  # the loss is computed here, not by the model
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                aux = model.aux_loss()  # read before the teacher's pass, which runs the model again
                loss = distillation_loss(model, batch, logits, stream.world_rows(), config.distill)
                if aux is not None:
                    loss = loss + model.memory_config.balance_weight * aux
            else:
                loss = model(**batch).loss
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window_tokens += int(batch["attention_mask"].sum())
            done = step + 1

            if done % config.log_every == 0 or done == config.steps:
                elapsed = time.perf_counter() - window_start
                usage = {str(i): round(m["used_share"], 4) for i, m in train_usage.metrics().items()}
                record = {"step": done, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                          "tokens_per_s": window_tokens / elapsed, "train_usage": usage, "dense_phase": dense_phase}
                run.append_metrics(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                usage="/".join(f"{u:.1%}" for u in usage.values()), refresh=False)
                train_usage.reset()
                window_tokens, window_start = 0, time.perf_counter()

            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                with _uncounted(train_usage):  # the evaluation's reads are not training reads
                    record = {"step": done, "eval": _periodic_eval(model, evaluate, usage_rows)}
                run.append_metrics(record)
                log.info("step %d: %s", done, record["eval"])
                model.train()
            if done % config.checkpoint_every == 0 or done == end:
                tensors, layout = flatten_optimizer(optimizer)
                run.save_checkpoint(model.save_pretrained, tensors, {"step": done, "optimizer": layout})
    model.eval()
    return model


@contextmanager
def _uncounted(monitor: UsageMonitor) -> Iterator[None]:
    """Reads inside the block leave `monitor`'s counts as they were (so a resumed run, whose window
    starts after the evaluation, logs the same training usage as an uninterrupted one)."""
    counts, batches = {i: c.clone() for i, c in monitor.counts.items()}, monitor.batches
    try:
        yield
    finally:
        for i, c in counts.items():
            monitor.counts[i].copy_(c)
        monitor.batches = batches


def _periodic_eval(model, evaluate, usage_rows) -> dict[str, Any]:
    model.eval()
    result: dict[str, Any] = {}
    if usage_rows is not None:
        result["heldout_usage"] = memory_usage(model, usage_rows)["blocks"]
    if evaluate is not None:
        result |= evaluate(model)
    return result


def make_optimizer(model: MemoryModel, config: PretrainConfig) -> torch.optim.AdamW:
    """The loop's AdamW over the model's parameter groups at the config's rates; a retrofit with a frozen
    base leaves the base's groups out, and their parameters take no gradient."""
    groups = model.param_groups(config.lr, weight_decay=config.weight_decay)
    if _frozen_base(config):
        # the base's parameters ("dense": everything outside the memory) take no gradient at all
        for g in groups:
            if g["name"].startswith("dense"):
                for p in g["params"]:
                    p.requires_grad_(False)
        groups = [g for g in groups if not g["name"].startswith("dense")]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))
