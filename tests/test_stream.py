"""Stream: a batch of a facts stream holds paraphrases of exactly one fact (statements, or with statements+qa also its
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
from smviz.train.stream import Stream


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


def texts_of(stream, step) -> list[str]:
    """The texts of the step's batch, found by matching its rows against every statement and Q/A line
    (training and held-out) of the stream's facts, each tokenised on its own."""
    universe = [t for f in stream.items for t in (*f.statements, *qa_lines(f, False), *qa_lines(f, True))]
    ref = encoded(stream.tokenizer, universe)
    return [ref[r] for r in real_rows(stream.batch(step))]


def real_rows(batch) -> list[tuple[int, ...]]:
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def qa_lines(fact, heldout: bool) -> list[str]:
    return [qa_text(q.text, fact.answer).rstrip("\n") for q in fact.questions if q.heldout == heldout]


def test_statement_batches_hold_paraphrases_of_the_one_current_fact(world, tokenizer):
    facts = world.new[:5]
    stream = Stream(facts, tokenizer, batch_size=6, steps_per_item=2)
    assert len(stream) == 10
    for step in range(len(stream)):
        fact = facts[step // 2]
        assert stream.item_index(step) == step // 2 and stream.item(step) is fact
        texts = texts_of(stream, step)
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
    assert texts_of(stream, 0) != texts_of(stream, 1)


def test_statements_plus_qa_uses_training_templates_only(world, tokenizer):
    facts = world.new[:4]
    stream = Stream(facts, tokenizer, batch_size=16, composition="statements+qa", seed=3)
    seen_qa = 0
    for step in range(len(stream)):
        fact = facts[step]
        allowed = list(fact.statements) + qa_lines(fact, heldout=False)
        assert len(qa_lines(fact, heldout=True)) > 0  # there is something to leak
        texts = texts_of(stream, step)
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
    plain = Stream(facts, tokenizer, batch_size=16, seed=3)
    assert not any(t.startswith("Question: ") for s in range(len(plain)) for t in texts_of(plain, s))


def test_same_seed_and_step_same_batch(world, tokenizer):
    facts = world.new[:3]
    a = Stream(facts, tokenizer, batch_size=5, steps_per_item=3, seed=7)
    b = Stream(list(facts), tokenizer, batch_size=5, steps_per_item=3, seed=7)
    for step in (8, 0, 4, 4):  # any order, repeated: no hidden state
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == y.keys() == {"input_ids", "attention_mask", "labels"}
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = Stream(facts, tokenizer, batch_size=5, steps_per_item=3, seed=8)
    assert any(texts_of(a, s) != texts_of(other, s) for s in range(len(a)))
    assert len({tuple(texts_of(a, s)) for s in range(3)}) == 3  # steps of one fact differ


def test_padding_labels_and_end_of_text(world, tokenizer):
    stream = Stream(world.new, tokenizer, batch_size=8, composition="statements+qa")
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
    stream = Stream([fact], tokenizer, batch_size=40, composition="statements+qa")
    pool = list(fact.statements) + qa_lines(fact, heldout=False)
    texts = texts_of(stream, 0)
    assert len(texts) == 40
    n = len(pool)
    assert sorted(texts[:n]) == sorted(pool) and sorted(texts[n : 2 * n]) == sorted(pool)
    counts = Counter(texts)
    assert set(counts) <= set(pool) and max(counts.values()) - min(counts.values()) <= 1


def test_invalid_streams_are_refused(world, tokenizer):
    with pytest.raises(ConfigError, match="no items"):
        Stream([], tokenizer)
    with pytest.raises(ConfigError, match="batch_size"):
        Stream(world.new, tokenizer, batch_size=0)
    with pytest.raises(ConfigError, match="steps_per_fact"):
        Stream(world.new, tokenizer, steps_per_item=0)
    with pytest.raises(ConfigError, match="statements\\+qa"):
        Stream(world.new, tokenizer, composition="qa")
    stream = Stream(world.new[:2], tokenizer, steps_per_item=2)
    for step in (-1, 4):
        with pytest.raises(ConfigError, match="outside the stream"):
            stream.batch(step)


# ---- streams of other kinds of data: documents, QA lines, editing records


def test_a_document_is_cut_into_windows_of_the_context_and_a_batch_draws_from_one_document(tokenizer):
    from smviz.data.schema import Document

    docs = [Document("a", " ".join(f"The river {i} flows north." for i in range(12))), Document("b", "A short note.")]
    stream = Stream(docs, tokenizer, batch_size=5, context=16, seed=1)
    eos = tokenizer.eos_token_id
    whole = tokenizer(docs[0].text, add_special_tokens=False)["input_ids"] + [eos]
    assert len(whole) > 32  # several windows
    windows = [tuple(whole[i : i + 16]) for i in range(0, len(whole), 16)]  # non-overlapping, the last one shorter
    assert [r.ids for r in stream.pool(0)] == windows and all(r.n_context == 0 for r in stream.pool(0))
    rows = real_rows(stream.batch(0))
    assert len(rows) == 5 and set(rows) <= set(windows) and len(set(rows)) == min(5, len(windows))
    short = tuple(tokenizer(docs[1].text, add_special_tokens=False)["input_ids"] + [eos])
    assert real_rows(stream.batch(1)) == [short] * 5  # a one-window document fills the batch with itself
    assert torch.equal(stream.batch(1)["labels"], stream.batch(1)["input_ids"])  # nothing masked: no padding, no context


def test_an_editing_record_trains_its_target_given_the_rewrite_prompt(tokenizer):
    from smviz.data.edits import EditRecord

    record = EditRecord("1", "Anna Berg", "{} was born in", "Paris", "Oslo", ("Anna Berg's birthplace is",), (), "counterfact")
    stream = Stream([record], tokenizer, batch_size=3)
    eos = tokenizer.eos_token_id
    prompt = tokenizer("Anna Berg was born in", add_special_tokens=True)["input_ids"]
    target = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    batch = stream.batch(0)
    assert real_rows(batch) == [tuple(prompt + target + [eos])] * 3
    expected_labels = [-100] * len(prompt) + target + [eos]  # the loss is on the target (and end-of-text) only
    assert batch["labels"].tolist() == [expected_labels] * 3


def test_a_qa_item_is_one_q_a_line_with_its_first_answer(tokenizer):
    from smviz.data.formats.qa import QAItem

    item = QAItem("q1", "Where was Anna Berg born?", ("Paris", "the French capital"))
    stream = Stream([item], tokenizer, batch_size=2)
    line = qa_text(item.question, "Paris").rstrip("\n")
    assert real_rows(stream.batch(0)) == [tuple(tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])] * 2


def test_a_stream_holds_one_kind_of_data(world, tokenizer):
    from smviz.data.formats.qa import QAItem

    with pytest.raises(ConfigError, match="one kind of data"):
        Stream([world.new[0], QAItem("q", "Who?", ("X",))], tokenizer)
    with pytest.raises(ConfigError, match="not a canonical record"):
        Stream(["just a string"], tokenizer)
