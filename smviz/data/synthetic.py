"""A synthetic lookup-table task that only a memory can solve: sequences of (key, value) token pairs
drawn from one fixed table, each pair at most once per sequence — so a value cannot be copied from
context and must come from the weights. Used by the demo and tests to show a memory layer storing
associations, and to measure the memory's share of that knowledge (accuracy with the memory off)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smviz.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class AssociationTask:
    """`n_pairs` random key → value token associations over a vocabulary, fixed by `seed`."""

    vocab_size: int
    n_pairs: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= self.vocab_size:
            raise ConfigError(f"n_pairs must be between 1 and vocab_size={self.vocab_size}, got {self.n_pairs}")
        g = torch.Generator().manual_seed(self.seed)
        self.keys = torch.randperm(self.vocab_size, generator=g)[: self.n_pairs]
        self.values = torch.randint(self.vocab_size, (self.n_pairs,), generator=g)

    def batch(self, batch_size: int, pairs_per_sequence: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`input_ids` (B, 2P) laid out k v k v …; `labels` keep only the value tokens (keys are random)."""
        if pairs_per_sequence > self.n_pairs:
            raise ConfigError(f"pairs_per_sequence ({pairs_per_sequence}) exceeds n_pairs ({self.n_pairs})")
        # distinct pairs within a sequence: the first P of a random permutation per row
        order = torch.rand(batch_size, self.n_pairs, generator=generator).argsort(dim=1)[:, :pairs_per_sequence]
        ids = torch.stack((self.keys[order], self.values[order]), dim=2).flatten(1)
        labels = ids.clone()
        labels[:, 0::2] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    @staticmethod
    def value_accuracy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
        """Share of value tokens predicted (argmax) at the key position before them."""
        predicted = logits[:, 0::2].argmax(-1)
        return (predicted == batch["input_ids"][:, 1::2]).float().mean().item()
