"""FactStream: a batch holds paraphrases of exactly one fact (statements, or with statements+qa also its
training-template Q/A lines, never a held-out question), `steps_per_fact` consecutive steps share a
fact, batches are a function of (seed, step), padding is masked in the attention mask and the labels
(and only there), and every row is one text followed by end-of-text. References are independent:
each text of a fact tokenised on its own, and texts matched by string against the fact's fields."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from smviz.data.corpus import load_articles
from smviz.data.facts import qa_text
from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import WorldConfig, generate_world
from smviz.errors import ConfigError
from smviz.train.stream import FactStream


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(n_known=4, n_bio_only=1, n_new=3))


@pytest.fixture(scope="module")
def tokenizer(world):
    facts = world.known + world.new
    texts = [a.text for a in load_articles()[:30]] + [s for f in facts for s in f.statements]
    texts += [qa_text(q.text, f.answer) for f in facts for q in f.questions]
    return train_tokenizer(texts, vocab_size=400)


def encoded(tokenizer, texts) -> dict[tuple[int, ...], str]:
    """Token ids (+ eos) of each text, tokenised one text at a time → the text."""
    eos = tokenizer.eos_token_id
    return {tuple(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]): t for t in texts}


def real_rows(batch) -> list[tuple[int, ...]]:
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def qa_lines(fact, heldout: bool) -> list[str]:
    return [qa_text(q.text, fact.answer).rstrip("\n") for q in fact.questions if q.heldout == heldout]


def test_statement_batches_hold_paraphrases_of_the_one_current_fact(world, tokenizer):
    facts = world.new[:5]
    stream = FactStream(facts, tokenizer, batch_size=6, steps_per_fact=2)
    assert len(stream) == 10
    for step in range(len(stream)):
        fact = facts[step // 2]
        assert stream.fact_index(step) == step // 2 and stream.fact(step) is fact
        texts = stream.texts(step)
        assert len(texts) == 6 and len(set(texts)) == 6  # the pool (16 statements) is larger than the batch
        assert set(texts) <= set(fact.statements)
        others = {s for f in facts if f is not fact for s in f.statements}
        assert not set(texts) & others
        # the token rows are exactly those texts, each tokenised alone and ended with eos
        ref = encoded(tokenizer, fact.statements)
        rows = real_rows(stream.batch(step))
        assert all(r in ref for r in rows), step
        assert [ref[r] for r in rows] == texts
    # the two steps of a fact see different draws from its statements
    assert stream.texts(0) != stream.texts(1)


def test_statements_plus_qa_uses_training_templates_only(world, tokenizer):
    facts = world.new[:4]
    stream = FactStream(facts, tokenizer, batch_size=16, composition="statements+qa", seed=3)
    seen_qa = 0
    for step in range(len(stream)):
        fact = facts[step]
        allowed = list(fact.statements) + qa_lines(fact, heldout=False)
        assert len(qa_lines(fact, heldout=True)) > 0  # there is something to leak
        texts = stream.texts(step)
        assert set(texts) <= set(allowed)
        for text in texts:
            for q in fact.heldout_questions:
                assert q.text not in text
        ref = encoded(tokenizer, allowed)
        assert all(r in ref for r in real_rows(stream.batch(step)))
        heldout_ids = encoded(tokenizer, qa_lines(fact, heldout=True))
        assert not set(real_rows(stream.batch(step))) & set(heldout_ids)
        seen_qa += sum(t.startswith("Question: ") for t in texts)
    assert seen_qa > 0  # the composition did add Q/A lines
    # "statements" never draws a Q/A line
    plain = FactStream(facts, tokenizer, batch_size=16, seed=3)
    assert not any(t.startswith("Question: ") for s in range(len(plain)) for t in plain.texts(s))


def test_same_seed_and_step_same_batch(world, tokenizer):
    facts = world.new[:3]
    a = FactStream(facts, tokenizer, batch_size=5, steps_per_fact=3, seed=7)
    b = FactStream(list(facts), tokenizer, batch_size=5, steps_per_fact=3, seed=7)
    for step in (8, 0, 4, 4):  # any order, repeated: no hidden state
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == y.keys() == {"input_ids", "attention_mask", "labels"}
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = FactStream(facts, tokenizer, batch_size=5, steps_per_fact=3, seed=8)
    assert any(a.texts(s) != other.texts(s) for s in range(len(a)))
    assert len({tuple(a.texts(s)) for s in range(3)}) == 3  # steps of one fact differ


def test_padding_labels_and_end_of_text(world, tokenizer):
    stream = FactStream(world.new, tokenizer, batch_size=8, composition="statements+qa")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    padded_somewhere = False
    for step in range(0, len(stream), 3):
        batch = stream.batch(step)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == torch.long and ids.shape == mask.shape == labels.shape
        assert torch.equal(labels == -100, mask == 0)  # -100 exactly at padding
        assert torch.equal(labels[mask == 1], ids[mask == 1])
        assert torch.equal(ids[mask == 0], torch.full_like(ids[mask == 0], pad))
        lengths = mask.sum(1)
        assert int(lengths.max()) == ids.shape[1]  # no all-padding column
        for i, n in enumerate(lengths.tolist()):
            assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
            assert ids[i, n - 1] == eos  # every row ends with end-of-text ...
            assert eos not in ids[i, : n - 1].tolist()  # ... once
        padded_somewhere |= bool((mask == 0).any())
    assert padded_somewhere


def test_batch_larger_than_the_pool_repeats_it_evenly(world, tokenizer):
    fact = world.new[0]
    stream = FactStream([fact], tokenizer, batch_size=40, composition="statements+qa")
    pool = list(fact.statements) + qa_lines(fact, heldout=False)
    texts = stream.texts(0)
    assert len(texts) == 40
    n = len(pool)
    assert sorted(texts[:n]) == sorted(pool) and sorted(texts[n : 2 * n]) == sorted(pool)
    counts = Counter(texts)
    assert set(counts) <= set(pool) and max(counts.values()) - min(counts.values()) <= 1


def test_invalid_streams_are_refused(world, tokenizer):
    with pytest.raises(ConfigError, match="no facts"):
        FactStream([], tokenizer)
    with pytest.raises(ConfigError, match="batch_size"):
        FactStream(world.new, tokenizer, batch_size=0)
    with pytest.raises(ConfigError, match="steps_per_fact"):
        FactStream(world.new, tokenizer, steps_per_fact=0)
    with pytest.raises(ConfigError, match="statements\\+qa"):
        FactStream(world.new, tokenizer, composition="qa")
    stream = FactStream(world.new[:2], tokenizer, steps_per_fact=2)
    for step in (-1, 4):
        with pytest.raises(ConfigError, match="outside the stream"):
            stream.batch(step)
