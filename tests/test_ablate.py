"""Slot ablation: weights bit-identical after ablating, an empty set changes nothing (Δlog-prob exactly
0), ablating the slots a question actually reads changes its log-prob, the ablated forward pass
equals one with those value rows zeroed by hand, answer log-prob against a direct computation,
ablation_test's random controls and ranks, and clear errors for slot ids out of range, an empty set
and an empty pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smviz.analysis.ablate import (
    ablate_slots,
    ablated,
    ablation_test,
    accessed_slots,
    answer_logprob,
)
from smviz.data.facts import Fact, Question, qa_prompt, qa_text
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import ConfigError, SmvizError
from smviz.model import MemoryModel


def make_facts(n: int = 3) -> list[Fact]:
    cities = ["Paris", "Lima", "Oslo", "Cairo"]
    return [Fact(id=f"f{i}", subject=f"Ada Number{i}", relation="birthplace", answer=cities[i],
                 statements=(f"Ada Number{i} was born in {cities[i]}.",),
                 questions=(Question(f"Where was Ada Number{i} born?", "birthplace/q1", False),
                            Question(f"In which city was Ada Number{i} born?", "birthplace/q2", True)))
            for i in range(n)]


@pytest.fixture(scope="module")
def model():
    facts = make_facts(4)
    texts = [s for f in facts for s in f.statements] + [qa_text(q.text, f.answer) for f in facts for q in f.questions]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    m = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    m.tokenizer = tokenizer
    return m.eval()


def read_slots(model, fact) -> np.ndarray:
    """Reference pool: slots read by the held-out question + answer, from a hook of our own."""
    seen = []
    handle = model.memory_layers[1].add_access_hook(lambda _l, i, w, m: seen.append(i.flatten().clone()))
    try:
        q = fact.heldout_questions[0]
        ids = model.tokenizer(f"{qa_prompt(q.text)} {fact.answer}")["input_ids"]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.cat(seen).unique().numpy()


def test_weights_unchanged_and_empty_set_changes_nothing(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fact = make_facts()[0]
    df = ablate_slots(model, read_slots(model, fact), [fact])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.memory_layers[1]._access_hooks  # hooks removed
    empty = ablate_slots(model, [], make_facts())
    assert (empty["delta_logprob"] == 0.0).all() and (empty["delta_f1"] == 0.0).all()
    assert (empty["answer_before"] == empty["answer_after"]).all()
    # the slots actually read carry the answer's probability: ablating them changes it
    assert (df["delta_logprob"].abs() > 1e-4).all()
    assert list(df.columns) == ["fact_id", "question", "gold", "logprob_before", "logprob_after", "delta_logprob",
                                "answer_before", "answer_after", "f1_before", "f1_after", "delta_f1"]


def test_ablated_forward_equals_zeroed_value_rows(model):
    """Zeroing a slot's read weight removes exactly V[slot]'s term: the same as a copy of the model whose
    value rows are zero (softmax weights are not renormalised, so the two agree)."""
    fact = make_facts()[1]
    slots = read_slots(model, fact)[:5]
    ids = torch.tensor([model.tokenizer(qa_prompt(fact.heldout_questions[0].text))["input_ids"]])
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.values[1][torch.as_tensor(slots)] = 0
        expected = ref(input_ids=ids).logits
        with ablated(model, slots):
            got = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain)


def test_answer_logprob_by_hand(model):
    fact = make_facts()[2]
    q = fact.heldout_questions[0].text
    prompt = model.tokenizer(qa_prompt(q))["input_ids"]
    answer = model.tokenizer(f"{qa_prompt(q)} {fact.answer}")["input_ids"][len(prompt):]
    assert answer and model.tokenizer(f"{qa_prompt(q)} {fact.answer}")["input_ids"][: len(prompt)] == prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    ref = sum(torch.log_softmax(logits[len(prompt) + j - 1], -1)[t].item() for j, t in enumerate(answer))
    assert answer_logprob(model, q, fact.answer) == pytest.approx(ref, rel=1e-9)


def test_ablation_test_controls(model):
    fact = make_facts()[0]
    pool = accessed_slots(model, fact)
    assert set(read_slots(model, fact)) <= set(pool)
    real = pool[:3]
    df = ablation_test(model, fact, real, draws=4, seed=0)
    assert list(df["set"]) == ["real"] + ["random"] * 4 and (df["n_slots"] == 3).all()
    assert df.attrs["pool_size"] == len(pool)
    assert df.loc[0, "delta_logprob"] == pytest.approx(ablate_slots(model, real, fact)["delta_logprob"].mean(), abs=1e-9)
    randoms = df[df["set"] == "random"]
    assert df.loc[0, "percentile"] == np.mean(randoms["delta_logprob"].to_numpy() > df.loc[0, "delta_logprob"])
    assert df.loc[0, "rank"] == 1 + int((randoms["delta_logprob"] < df.loc[0, "delta_logprob"]).sum())
    again = ablation_test(model, fact, real, draws=4, seed=0)
    assert again.equals(df)  # seeded


def test_bad_input(model):
    fact = make_facts()[0]
    with pytest.raises(ConfigError, match="out of range"):
        ablate_slots(model, [256], fact)
    with pytest.raises(ConfigError, match="out of range"):
        ablate_slots(model, [-1], fact)
    with pytest.raises(ConfigError, match="empty"):
        ablation_test(model, fact, [], draws=2)
    with pytest.raises(ConfigError, match="pool"):
        ablation_test(model, fact, [1, 2], pool=[1, 2], draws=2)
    with pytest.raises(ConfigError, match="no memory layer"):
        ablate_slots(model, {0: [1]}, fact)
    with pytest.raises(ConfigError, match="no facts"):
        ablate_slots(model, [1], [])
    with torch.enable_grad(), ablated(model, [1]), pytest.raises(SmvizError, match="no_grad"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
