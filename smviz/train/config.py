"""`FinetuneConfig`: how a stream of facts is learned — every field documented (`--help` is generated from
the fields' help), checked, and recorded with the run. Defaults that depend on the method (optimizer,
learning rate) come from the method registry (`smviz.train.methods`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import smviz.train.builtin  # noqa: F401  (registers the built-in methods, which the `method` help lists)
from smviz.config import from_dict
from smviz.errors import ConfigError
from smviz.train.lora import DEFAULT_TARGETS
from smviz.train.methods import ALL_PARAMETERS, OPTIMIZERS, VALUE_ROWS, Method, get_method, method_names
from smviz.train.stream import COMPOSITIONS

DEFAULT_WEIGHT_DECAY = 0.1  # AdamW's, when none is given


@dataclass
class FinetuneConfig:
    """How a stream is learned. Every field is part of the protocol recorded with the run."""

    method: str = field(default="sparse", metadata={"help": f"finetuning method: {', '.join(method_names())}"})
    top_t: int = field(default=500, metadata={"help": "value rows trained per step and memory layer ("
                                              f"{', '.join(m for m in method_names() if get_method(m).uses_top_t)})"})
    optimizer: str | None = field(default=None, metadata={"help": "sgd or adamw (default: the method's; sgd for value-row methods, adamw for full / lora)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate, a finite number > 0 (default: the method's, per optimizer)"})
    weight_decay: float | None = field(default=None, metadata={"help": f"AdamW decoupled weight decay (default {DEFAULT_WEIGHT_DECAY}); SGD has none"})
    batch_size: int = field(default=16, metadata={"help": "paraphrases of the current fact per step (the paper: 64)"})
    steps_per_fact: int = field(default=10, metadata={"help": "steps on each fact before the next arrives (the paper: ~10)"})
    composition: str = field(default="statements+qa", metadata={
        "help": "statements (the paper) or statements+qa (plus Q/A lines of training templates; the default: "
                "from statements alone the tiny model's memory learns almost nothing, analyses/finetuning.md)"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations (also the resume points)"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    lora_targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
        "help": "names of the linear layers LoRA adapts (nn.Linear or GPT-2's Conv1D; those present are used); "
                "query, w1 and w2 are a memory layer's projections (smviz.train.lora.MEMORY_TARGETS)"})
    value_lr_mult: float = field(default=1.0, metadata={
        "help": "full: the value tables' learning rate as a multiple of lr (pretraining trains them at the model's "
                "MemoryConfig.value_lr_mult, 10 in the presets)"})
    freeze_memory: bool = field(default=False, metadata={
        "help": "full: the memory layers (keys, query, values, projections) stay frozen; every other parameter trains"})
    checkpoint_every: int = field(default=0, metadata={"help": "steps between full model checkpoints (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of batch composition, LoRA initialisation and random-t selection"})

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):  # "q_proj,v_proj" from the command line
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        self.lora_targets = tuple(self.lora_targets)
        get_method(self.method)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose sgd or adamw")
        for name in ("lr", "lora_alpha", "value_lr_mult"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        wd = self.weight_decay
        if wd is not None and not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {wd}")
        if self.top_t < 1:
            raise ConfigError(f"top_t must be >= 1, got {self.top_t}")
        for name in ("batch_size", "steps_per_fact", "eval_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.value_lr_mult != 1.0 or self.freeze_memory) and self.spec.trains != ALL_PARAMETERS:
            raise ConfigError(f"value_lr_mult and freeze_memory are settings of full finetuning, not of {self.method!r}")
        if self.value_lr_mult != 1.0 and self.freeze_memory:
            raise ConfigError("value_lr_mult is the lr of value tables that train: it cannot be set with freeze_memory")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")
        if self.composition not in COMPOSITIONS:
            raise ConfigError(f"unknown composition {self.composition!r}; choose one of {list(COMPOSITIONS)}")

    @property
    def spec(self) -> Method:
        """The method's registry entry (`smviz.train.methods.Method`)."""
        return get_method(self.method)

    @property
    def sparse(self) -> bool:
        """The method trains value rows chosen by a selection rule (not full / LoRA)."""
        return self.spec.trains == VALUE_ROWS

    def resolved(self) -> FinetuneConfig:
        """The config with every default filled in (what the run records)."""
        optimizer = self.optimizer or self.spec.default_optimizer
        lr = self.lr if self.lr is not None else self.spec.default_lr[optimizer]
        wd = self.weight_decay if self.weight_decay is not None else (DEFAULT_WEIGHT_DECAY if optimizer == "adamw" else 0.0)
        if optimizer == "sgd" and wd:
            raise ConfigError("weight decay is an AdamW setting here; SGD runs without it")
        return dataclasses.replace(self, optimizer=optimizer, lr=lr, weight_decay=wd)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """A config from a dict (a run's config.json, flags): every value checked against its field's
        type, unknown keys ignored with a warning."""
        return from_dict(cls, d)
