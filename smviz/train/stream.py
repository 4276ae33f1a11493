"""The continual-learning stream: facts arrive one at a time, as in the paper (§5.1). Step s trains on
one batch of `batch_size` paraphrases of fact s // steps_per_fact; after `steps_per_fact` steps the
next fact comes; nothing is shuffled across facts.

A batch's rows are drawn (seeded by (seed, step), so a resumed run sees the same batches) from the
fact's statement paraphrases, or with composition "statements+qa" also from Q/A lines written with
its *training* question templates — never the held-out ones, which the evaluation asks. Each row is
one text followed by end-of-text, right-padded; padding is masked in the attention mask and labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smviz.data.facts import Fact, qa_text
from smviz.data.tokenizer import right_pad
from smviz.errors import ConfigError
from smviz.train.data import IGNORE_INDEX

COMPOSITIONS = ("statements", "statements+qa")
# what sparse finetuning ranks a batch's slots against: the model's pretraining statistics (the paper's
# default) or the stream's own batches (its Fig. 7 ablation)
BACKGROUNDS = ("pretraining", "stream")


@dataclass
class FactStream:
    facts: Sequence[Fact]
    tokenizer: Any
    batch_size: int = 16
    steps_per_fact: int = 1
    composition: str = "statements"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.facts:
            raise ConfigError("the stream has no facts")
        if self.batch_size < 1 or self.steps_per_fact < 1:
            raise ConfigError(f"batch_size and steps_per_fact must be >= 1, got {self.batch_size} and {self.steps_per_fact}")
        if self.composition not in COMPOSITIONS:
            raise ConfigError(f"unknown batch composition {self.composition!r}; choose one of {list(COMPOSITIONS)}")

    def __len__(self) -> int:
        """Steps in the stream."""
        return len(self.facts) * self.steps_per_fact

    def fact_index(self, step: int) -> int:
        return step // self.steps_per_fact

    def fact(self, step: int) -> Fact:
        return self.facts[self.fact_index(step)]

    def pool(self, fact: Fact) -> list[str]:
        """The texts a batch of `fact` draws from."""
        texts = list(fact.statements)
        if self.composition == "statements+qa":
            texts += [qa_text(q.text, fact.answer).rstrip("\n") for q in fact.training_questions]
        return texts

    def texts(self, step: int) -> list[str]:
        """The batch's texts: the pool in a seeded order, repeated as often as the batch needs."""
        if not 0 <= step < len(self):
            raise ConfigError(f"step {step} is outside the stream (0..{len(self) - 1})")
        pool = self.pool(self.fact(step))
        rng = random.Random(self.seed * 1_000_003 + step)
        out: list[str] = []
        while len(out) < self.batch_size:
            out += rng.sample(pool, min(len(pool), self.batch_size - len(out)))
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (padding: -100) of step `step`."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        rows = [ids + [eos] for ids in self.tokenizer(self.texts(step), add_special_tokens=False)["input_ids"]]
        ids, mask = right_pad(rows, pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def stream_stats(model: Any, stream: FactStream) -> Any:
    """Background statistics of the stream's own batches, one document per step (batch unit): what
    the paper's Fig. 7 ranks against in place of pretraining data. Deterministic: the batches are."""
    from smviz.stats import collect_stats

    protocol = {"source": "stream", "facts": len(stream.facts), "batch_size": stream.batch_size,
                "steps_per_fact": stream.steps_per_fact, "composition": stream.composition, "seed": stream.seed}
    batches = (stream.batch(step) for step in range(len(stream)))
    return collect_stats(model, batches, unit="batch", protocol=protocol)
