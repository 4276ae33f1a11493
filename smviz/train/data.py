"""Pretraining data: the texts a model learns the fact world from, and the deterministic batch stream
that mixes them with background corpus rows.

World texts (`world_documents`): for each person of the trained populations, several biographies —
one random statement paraphrase per relation, in random order — so every paraphrase is seen in
varied contexts (Allen-Zhu & Li's "multi + permute" augmentation, which makes knowledge extractable
by questions); for the `known` population also Q/A documents written with the *training* question
templates only. Held-out question templates never appear in any text produced here. Q/A documents are
in the fact world's own format (`qa`: one document per person, its pairs in random order) or in another
prompt format of `smviz.data.prompts` (`chat` for a chat-tuned base model: one document per pair, the
format's `training_text`, so that a row of a few dozen tokens holds a whole conversation).

`PretrainStream.batch(step)` is a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smviz.data.facts import Fact, qa_text
from smviz.data.prompts import get_prompt_format
from smviz.errors import SmvizError

IGNORE_INDEX = -100


def world_documents(
    bio_facts: Sequence[Fact], qa_facts: Sequence[Fact], *, copies: int, seed: int,
    prompt_format: str = "qa", tokenizer=None,
) -> list[str]:
    """`copies` biographies per person of `bio_facts`, and `copies` Q/A documents per person of
    `qa_facts` (training templates only), in a seeded shuffled order. With a `prompt_format` other
    than qa, each of a person's Q/A pairs is its own document, written by that format (which may need
    the `tokenizer`: chat uses its chat template)."""
    fmt = get_prompt_format(prompt_format)
    fmt.check(tokenizer)  # chat without a chat template: ConfigError before anything is built
    rng = random.Random(seed)
    docs: list[str] = []
    for person_facts in _by_person(bio_facts):
        for _ in range(copies):
            sentences = [rng.choice(f.statements) for f in person_facts]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
    for person_facts in _by_person(qa_facts):
        for _ in range(copies):
            if fmt.name == "qa":
                lines = [qa_text(rng.choice(f.training_questions).text, f.answer) for f in person_facts]
                rng.shuffle(lines)
                docs.append("".join(lines).rstrip("\n"))
            else:
                docs.extend(fmt.training_text(tokenizer, rng.choice(f.training_questions).text, f.answer) for f in person_facts)
    rng.shuffle(docs)
    return docs


def _by_person(facts: Sequence[Fact]) -> list[list[Fact]]:
    people: dict[str, list[Fact]] = {}
    for f in facts:
        people.setdefault(f.subject, []).append(f)
    return list(people.values())


def pack_whole_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack documents (each followed by eos) into rows of `seq_len` without splitting any document, so
    a fact's subject is always in its row. Returns input ids and labels (padding labelled -100).
    Documents longer than a row are cut to it."""
    rows: list[list[int]] = []
    current: list[int] = []
    for tokens in token_lists:
        doc = list(tokens[: seq_len - 1]) + [eos]
        if len(current) + len(doc) > seq_len:
            rows.append(current)
            current = []
        current = current + doc
    if current:
        rows.append(current)
    ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        labels[i, : len(row)] = row
    return torch.from_numpy(ids), torch.from_numpy(labels)


@dataclass
class PretrainStream:
    """Batches of `batch_size` rows: about `fact_share` of them world rows, about `replay_share` replay
    rows (a retrofit's self-distillation replay, when it has a pool of its own), the rest corpus rows,
    drawn with replacement by a generator seeded from (seed, step)."""

    corpus_rows: torch.Tensor  # (n, seq_len) token ids, every position a real token
    world_ids: torch.Tensor  # (m, seq_len)
    world_labels: torch.Tensor  # (m, seq_len), -100 on padding
    batch_size: int
    fact_share: float
    seed: int
    replay_ids: torch.Tensor | None = None  # (r, seq_len), right-padded like world rows
    replay_labels: torch.Tensor | None = None
    replay_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.fact_share <= 1:
            raise SmvizError(f"fact_share must lie in [0, 1], got {self.fact_share}")
        if not (0 <= self.replay_share and self.fact_share + self.replay_share <= 1 + 1e-9):
            raise SmvizError(f"replay_share must lie in [0, 1 - fact_share], got {self.replay_share} "
                             f"(fact_share {self.fact_share})")
        if self.replay_share > 0 and (self.replay_ids is None or len(self.replay_ids) == 0):
            raise SmvizError("replay_share > 0 but there are no replay rows")
        if self.fact_share > 0 and len(self.world_ids) == 0:
            raise SmvizError("fact_share > 0 but there are no world rows")
        if self.fact_share < 1 and len(self.corpus_rows) == 0:
            raise SmvizError("fact_share < 1 but the corpus is empty")

    def world_rows(self, fact_share: float | None = None) -> int:
        """How many of a batch's rows are world rows: they come first, then corpus rows, then replay rows."""
        return round(self.batch_size * (self.fact_share if fact_share is None else fact_share))

    def batch(self, step: int, fact_share: float | None = None) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n_world = self.world_rows(fact_share)
        n_replay = min(round(self.batch_size * self.replay_share), self.batch_size - n_world)
        n_corpus = self.batch_size - n_world - n_replay
        w = torch.randint(len(self.world_ids), (n_world,), generator=g) if n_world else torch.empty(0, dtype=torch.long)
        c = torch.randint(len(self.corpus_rows), (n_corpus,), generator=g) if n_corpus else torch.empty(0, dtype=torch.long)
        ids = [self.world_ids[w], self.corpus_rows[c]]
        labels = [self.world_labels[w], self.corpus_rows[c]]
        if n_replay:  # drawn last, so that a stream without replay rows is what it always was
            r = torch.randint(len(self.replay_ids), (n_replay,), generator=g)
            ids.append(self.replay_ids[r])
            labels.append(self.replay_labels[r])
        ids, labels = torch.cat(ids), torch.cat(labels)
        # world rows are right-padded; the mask keeps padding out of usage counts and access records
        return {"input_ids": ids, "labels": labels, "attention_mask": (labels != IGNORE_INDEX).long()}
