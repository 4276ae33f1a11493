"""The continual-learning stream: items arrive one at a time, as in the paper (§5.1). Step s trains on
one batch of `batch_size` rows of item s // steps_per_item; after `steps_per_item` steps the next item
comes; nothing is shuffled across items.

An item is any canonical record (`smviz.data.formats`), and its kind decides the rows a batch draws from:
- a fact: its statement paraphrases, or with composition "statements+qa" also Q/A lines written with
  its *training* question templates (never the held-out ones, which the evaluation asks);
- a QA item (`qa` kind): its question with its first answer, as a Q/A line;
- a document: its text cut into windows of `context` tokens (as recording cuts text, here without
  overlap: each token is trained on once per pass);
- an editing record: its rewrite prompt followed by `target_new`, the loss on the target only (the
  editing field's finetuning baseline, FT-L, trains the target given the prompt; everything else trains
  on the whole text, as the paper does).
Q/A lines are laid out in the stream's prompt format and editing prompts in its editing counterpart
(`smviz.data.prompts.edit_prompt_format`).

A batch's rows are drawn (seeded by (seed, step), so a resumed run sees the same batches) from the item's
pool, repeated as often as the batch needs. Each row ends with end-of-text and is right-padded; padding
is masked in the attention mask and labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from smviz.data.formats.canonical import record_kind
from smviz.data.prompts import edit_prompt_format, get_prompt_format
from smviz.data.tokenizer import right_pad
from smviz.errors import ConfigError
from smviz.record import chunk_spans
from smviz.train.data import IGNORE_INDEX

COMPOSITIONS = ("statements", "statements+qa")
# what sparse finetuning ranks a batch's slots against: the model's pretraining statistics (the paper's
# default) or the stream's own batches (its Fig. 7 ablation)
BACKGROUNDS = ("pretraining", "stream")


class Row(NamedTuple):
    """One training row: token ids (ending with end-of-text) whose first `n_context` are context only
    (labelled -100: not trained on)."""

    ids: tuple[int, ...]
    n_context: int = 0


@dataclass
class Stream:
    items: Sequence[Any]
    tokenizer: Any
    batch_size: int = 16
    steps_per_item: int = 1
    composition: str = "statements"
    seed: int = 0
    prompt_format: str = "qa"
    context: int = 128  # tokens per document window
    kind: str = field(init=False)  # the items' kind of data: facts, qa, documents or edits
    _pools: dict[int, list[Row]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise ConfigError("the stream has no items")
        if self.batch_size < 1 or self.steps_per_item < 1:
            raise ConfigError(f"batch_size and steps_per_fact must be >= 1, got {self.batch_size} and {self.steps_per_item}")
        if self.composition not in COMPOSITIONS:
            raise ConfigError(f"unknown batch composition {self.composition!r}; choose one of {list(COMPOSITIONS)}")
        if self.context < 2:
            raise ConfigError(f"context must be >= 2 tokens, got {self.context}")
        kinds = {record_kind(item) for item in self.items}
        if len(kinds) > 1:
            raise ConfigError(f"a stream holds one kind of data, got {', '.join(sorted(kinds))}")
        self.kind = kinds.pop()
        self.format = get_prompt_format(edit_prompt_format(self.prompt_format) if self.kind == "edits" else self.prompt_format)
        if self.kind in ("qa", "edits") or self.composition == "statements+qa":
            self.format.check(self.tokenizer)

    def __len__(self) -> int:
        """Steps in the stream."""
        return len(self.items) * self.steps_per_item

    def item_index(self, step: int) -> int:
        return step // self.steps_per_item

    def item(self, step: int) -> Any:
        return self.items[self.item_index(step)]

    def pool(self, index: int) -> list[Row]:
        """The rows a batch of item `index` draws from (computed once per item)."""
        if index not in self._pools:
            self._pools[index] = self._rows_of(self.items[index])
        return self._pools[index]

    def _rows_of(self, item: Any) -> list[Row]:
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        if self.kind == "edits":
            prompt, target = self.format.encode_pair(tok, item.rewrite_prompt, item.target_new)
            return [Row(tuple(prompt + target + [eos]), len(prompt))]
        if self.kind == "documents":
            ids = tok(item.text, add_special_tokens=False)["input_ids"] + [eos]
            return [Row(tuple(ids[a:b])) for a, b, _ in chunk_spans(len(ids), self.context, self.context)]
        if self.kind == "qa":
            texts = [self.format.training_text(tok, item.question, item.answers[0])]
        else:
            texts = list(item.statements)
            if self.composition == "statements+qa":
                texts += [self.format.training_text(tok, q.text, item.answer) for q in item.training_questions]
        return [Row(tuple(ids + [eos])) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    def draw(self, step: int) -> list[int]:
        """Indices into the step's pool: the pool in a seeded order, repeated as often as the batch needs."""
        if not 0 <= step < len(self):
            raise ConfigError(f"step {step} is outside the stream (0..{len(self) - 1})")
        n = len(self.pool(self.item_index(step)))
        rng = random.Random(self.seed * 1_000_003 + step)
        out: list[int] = []
        while len(out) < self.batch_size:
            out += rng.sample(range(n), min(n, self.batch_size - len(out)))
        return out

    def rows(self, step: int) -> list[Row]:
        drawn = self.draw(step)  # checks the step first
        pool = self.pool(self.item_index(step))
        return [pool[i] for i in drawn]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (padding and context: -100) of step `step`."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        rows = self.rows(step)
        ids, mask = right_pad([list(r.ids) for r in rows], pad)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        for i, r in enumerate(rows):
            labels[i, : r.n_context] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def describe(self) -> dict[str, Any]:
        """How the stream's batches are made (recorded with the run)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "facts":
            out["composition"] = self.composition
        if self.kind in ("qa", "edits") or (self.kind == "facts" and self.composition == "statements+qa"):
            out["prompt_format"] = self.format.name
        if self.kind == "documents":
            out["context"] = self.context
        return out


def stream_stats(model: Any, stream: Stream) -> Any:
    """Background statistics of the stream's own batches, one document per step (batch unit): what
    the paper's Fig. 7 ranks against in place of pretraining data. Deterministic: the batches are."""
    from smviz.stats import collect_stats

    protocol = {"source": "stream", "facts": len(stream.items), "batch_size": stream.batch_size,
                "steps_per_fact": stream.steps_per_item, "composition": stream.composition, "seed": stream.seed}
    batches = (stream.batch(step) for step in range(len(stream)))
    return collect_stats(model, batches, unit="batch", protocol=protocol)
