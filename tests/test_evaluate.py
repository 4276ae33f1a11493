"""Tests of smviz.evaluate: SQuAD scoring on hand-computed cases, batched left-padded QA decoding against
an independent unbatched greedy loop, a trained micro model that answers its facts, NLL and usage
against hand computations, and the shape of the full evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from smviz.data.facts import Fact, Question, qa_prompt, qa_text
from smviz.errors import ModelFileError
from smviz.evaluate import (
    answer_contained,
    answer_questions,
    evaluate_model,
    exact_match,
    format_report,
    heldout_nll,
    memory_usage,
    normalize_answer,
    qa_metrics,
    token_f1,
)
from smviz.model import MemoryModel

EOT = "<|endoftext|>"
MAX_NEW = 12


def fact(fid: str, subject: str, relation: str, answer: str, train_q: list[str], heldout_q: list[str]) -> Fact:
    questions = [Question(q, f"{relation}/t{i}", False) for i, q in enumerate(train_q)]
    questions += [Question(q, f"{relation}/h{i}", True) for i, q in enumerate(heldout_q)]
    return Fact(fid, subject, relation, answer, (f"{subject} {relation} {answer}.",), tuple(questions))


FACTS = [
    fact("f1", "Ada Lovelace", "birthplace", "London",
         ["Where was Ada Lovelace born?"], ["In which city was Ada Lovelace born?", "Ada Lovelace's birthplace?"]),
    fact("f2", "Alan Turing", "employer", "Bletchley Park",
         ["Where did Alan Turing work?"], ["Who employed Alan Turing during the war?"]),
    fact("f3", "Grace Hopper", "birthplace", "New York",
         ["Where was Grace Hopper born?"], ["Grace Hopper was born in which city?"]),
    fact("f4", "Marie Curie", "field", "physics",
         ["What did Marie Curie study?"], ["Marie Curie worked in which field of science?"]),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained on the facts' texts; eos = bos = pad = unk = <|endoftext|>."""
    texts = [qa_text(q.text, f.answer) for f in FACTS for q in f.questions] + [s for f in FACTS for s in f.statements]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=EOT, unk_token=EOT)


def micro(tokenizer, seed: int = 0, **memory) -> MemoryModel:
    model = MemoryModel.from_preset("micro", seed=seed, vocab_size=len(tokenizer), **memory)
    model.tokenizer = tokenizer
    return model.eval()


@pytest.fixture(scope="module")
def trained(tokenizer) -> MemoryModel:
    """A micro model trained on the training-template QA text of FACTS until it reproduces it."""
    torch.manual_seed(0)
    model = micro(tokenizer, seed=1)
    texts = [qa_text(q.text, f.answer) for f in FACTS for q in f.training_questions]
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # right padding (the default)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(400):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 and loss.item() < 0.01:
            break
    return model.eval()


def greedy_reference(model: MemoryModel, tokenizer, question: str) -> str:
    """One question alone, as `qa_prompt` text (`greedy_ids_reference`)."""
    return greedy_ids_reference(model, tokenizer, tokenizer(qa_prompt(question))["input_ids"])


def greedy_ids_reference(model: MemoryModel, tokenizer, ids: list[int], max_new: int = MAX_NEW) -> str:
    """One prompt alone: no batching, no padding, no cache — a full forward per step, argmax."""
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids + generated])).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
            if "\n" in tokenizer.decode([token]):
                break
    return tokenizer.decode(generated, skip_special_tokens=True).split("\n", 1)[0].strip()


# --------------------------------------------------------------------------- scoring


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear; THE end.") == "apple pear end"
    assert normalize_answer("Theatre anthem") == "theatre anthem"  # articles only as whole words
    assert normalize_answer("  \n ") == ""


def test_exact_match():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("a", "") == 1.0  # 'a' is an article: both normalise to ''


def test_token_f1_hand_computed():
    # pred tokens: eiffel tower in paris (4); gold: eiffel tower (2); overlap 2
    # P = 2/4, R = 2/2, F1 = 2·(1/2·1)/(1/2+1) = 2/3
    assert token_f1("the Eiffel tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    # multiset overlap: pred 'new new york' vs 'new york' → overlap 2, P = 2/3, R = 1 → 0.8
    assert token_f1("new new york", "New York") == pytest.approx(0.8)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # both empty after normalisation
    assert token_f1("", "London") == 0.0
    assert token_f1("London", "") == 0.0


def test_qa_metrics_hand_computed():
    rows = [
        {"relation": "a", "em": 1.0, "f1": 1.0},
        {"relation": "a", "em": 0.0, "f1": 0.5},
        {"relation": "b", "em": 0.0, "f1": 0.0},
    ]
    m = qa_metrics(rows)
    assert m["n"] == 3 and m["em"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.5)
    assert m["per_relation"] == {"a": {"em": 0.5, "f1": 0.75, "n": 2}, "b": {"em": 0.0, "f1": 0.0, "n": 1}}
    assert "protocol" in m
    empty = qa_metrics([])
    assert empty["n"] == 0 and empty["em"] is None and empty["per_relation"] == {}


# --------------------------------------------------------------------------- answering


def babbler(tokenizer, seed: int) -> MemoryModel:
    """A micro model whose greedy output is varied: a freshly initialised micro model with tied embeddings
    just repeats its last token, so the output head is untied and random, with the newline token's row
    scaled up so that some answers stop early (one at once)."""
    model = micro(tokenizer, seed=seed)
    weight = torch.randn(model.lm.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed))
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i]):
            weight[i] *= 2.5
    model.lm.lm_head.weight = torch.nn.Parameter(weight)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_answers_match_unbatched_greedy(tokenizer, seed):
    model = babbler(tokenizer, seed)
    tokenizer.padding_side = "right"
    lengths = {len(tokenizer(qa_prompt(q.text))["input_ids"]) for f in FACTS for q in f.heldout_questions}
    assert len(lengths) > 2  # prompts of different lengths: the batch really is padded
    rows = answer_questions(model, FACTS, heldout=True, batch_size=8, max_new_tokens=MAX_NEW)
    assert tokenizer.padding_side == "right"
    expected_questions = [(f.id, q.template, q.text) for f in FACTS for q in f.heldout_questions]
    assert [(r["fact_id"], r["template"], r["question"]) for r in rows] == expected_questions
    for r in rows:
        assert set(r) == {"fact_id", "relation", "template", "question", "gold", "prediction", "em", "f1", "contained"}
        assert r["prediction"] == greedy_reference(model, tokenizer, r["question"])
        assert r["em"] == exact_match(r["prediction"], r["gold"]) and r["f1"] == token_f1(r["prediction"], r["gold"])
        assert r["contained"] == answer_contained(r["prediction"], r["gold"])
    lengths = [len(tokenizer(r["prediction"])["input_ids"]) for r in rows]
    assert min(lengths) < MAX_NEW - 2 and max(lengths) >= MAX_NEW - 2  # some rows stopped early, some ran on
    # batch size must not change the answers
    assert [r["prediction"] for r in answer_questions(model, FACTS, batch_size=2)] == [r["prediction"] for r in rows]


def test_trained_model_answers_its_facts(tokenizer, trained):
    calls = []
    handle = trained.lm.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        rows = answer_questions(trained, FACTS, heldout=False, batch_size=8, max_new_tokens=MAX_NEW)
    finally:
        handle.remove()
    assert [r["prediction"] for r in rows] == [f.answer for f in FACTS]
    assert qa_metrics(rows)["em"] == 1.0 and qa_metrics(rows)["f1"] == 1.0
    # one batch; it ends once every row has produced its newline, well before MAX_NEW steps
    longest = max(len(tokenizer(" " + f.answer + "\n")["input_ids"]) for f in FACTS)
    assert len(calls) == longest < MAX_NEW
    # held-out questions: whatever it answers, it answers what the unbatched loop answers
    for r in answer_questions(trained, FACTS, heldout=True, batch_size=8):
        assert r["prediction"] == greedy_reference(trained, tokenizer, r["question"])


def test_answering_needs_a_tokenizer(tokenizer):
    model = micro(tokenizer)
    model.tokenizer = None
    with pytest.raises(ModelFileError, match="the model has no tokenizer, and answering questions needs one"):
        answer_questions(model, FACTS)


def test_evaluating_a_model_built_without_a_tokenizer_says_what_to_do(tmp_path):
    """Case 8 of issue 14: a model saved as `smviz build --preset micro` saves it (no tokenizer) is
    refused by the evaluation with one line naming the problem and the remedy, before any work."""
    built = tmp_path / "built"
    MemoryModel.from_preset("micro", seed=0).save_pretrained(built)
    before = sorted((p.name, p.read_bytes()) for p in built.iterdir())
    model = MemoryModel.from_pretrained(built)
    rows = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ModelFileError) as err:
        evaluate_model(model, facts={"known": FACTS}, heldout_rows=rows, usage_rows=rows)
    message = str(err.value)
    assert message.startswith("the model has no tokenizer, and evaluation needs one")
    assert "smviz pretrain" in message and "\n" not in message
    assert sorted((p.name, p.read_bytes()) for p in built.iterdir()) == before


def test_answering_restores_training_mode(tokenizer):
    model = micro(tokenizer).train()
    answer_questions(model, FACTS[:1], max_new_tokens=2)
    assert model.training


# --------------------------------------------------------------------------- NLL and usage


def test_heldout_nll_matches_hand_computation(tokenizer):
    model = micro(tokenizer)
    rows = torch.randint(len(tokenizer), (5, 10), generator=torch.Generator().manual_seed(0))
    out = heldout_nll(model, rows, batch_size=2)  # batches of 2, 2, 1: a mean of batch means would differ
    with torch.no_grad():
        logits = model(input_ids=rows).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    assert out["nll"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["tokens"] == 5 * 9 and out["rows"] == 5 and out["seq_len"] == 10
    assert out["ppl"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    assert "5 rows of 10" in out["protocol"]


def test_heldout_nll_with_padding_mask(tokenizer):
    model = micro(tokenizer)
    rows = torch.randint(len(tokenizer), (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(rows)
    mask[0, 5:] = 0  # right padding of row 0: targets 5..7 are not counted
    out = heldout_nll(model, rows, batch_size=2, attention_mask=mask)
    losses = []
    with torch.no_grad():
        for i in range(3):
            n = int(mask[i].sum())
            logits = model(input_ids=rows[i : i + 1, :n]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], rows[i, 1:n], reduction="sum"))
    assert out["tokens"] == 4 + 7 + 7
    assert out["nll"] == pytest.approx(sum(losses).item() / 18, rel=1e-5)


def test_memory_usage_counts_every_read(tokenizer):
    model = micro(tokenizer, layers=(0, 1))
    c = model.memory_config
    rows = torch.randint(len(tokenizer), (5, 7), generator=torch.Generator().manual_seed(2))
    out = memory_usage(model, rows, batch_size=2)
    assert set(out["blocks"]) == {"0", "1"} and out["tokens"] == 35
    for m in out["blocks"].values():
        assert m["accesses"] == 5 * 7 * c.heads * c.knn
        assert m["slots"] == c.n_slots and 0 < m["used_share"] <= 1
        assert m["batches"] == 3
    mask = torch.ones_like(rows)
    mask[1, :3] = 0  # left padding of row 1
    masked = memory_usage(model, rows, batch_size=2, attention_mask=mask)
    assert masked["tokens"] == 32
    assert all(m["accesses"] == 32 * c.heads * c.knn for m in masked["blocks"].values())
    assert "32 tokens" in masked["protocol"]


# --------------------------------------------------------------------------- full evaluation


def test_evaluate_model(tokenizer, trained):
    populations = {"known": FACTS[:3], "new": FACTS[3:]}
    gen = torch.Generator().manual_seed(3)
    heldout_rows = torch.randint(len(tokenizer), (4, 16), generator=gen)
    usage_rows = torch.randint(len(tokenizer), (3, 16), generator=gen)
    result = evaluate_model(
        trained, facts=populations, heldout_rows=heldout_rows, usage_rows=usage_rows, include_rows=True, batch_size=4
    )
    json.dumps(result, allow_nan=False)  # strict JSON
    assert set(result) == {"model_hash", "protocol", "memory_on", "memory_off", "derived"}
    p = result["protocol"]
    assert p["question_set"].startswith("heldout templates")
    assert p["decoding"] == f"greedy, max_new_tokens={MAX_NEW}, stop at newline"
    assert p["scoring"] == "SQuAD normalisation"
    assert p["nll"] == "mean per token over 4 rows of 16"
    assert p["usage"] == "reads counted over 48 tokens, padding excluded"

    on, off = result["memory_on"], result["memory_off"]
    assert set(on["qa"]) == {"known", "new"} and set(on["qa_training_templates"]) == {"known"}
    assert on["qa"]["known"]["n"] == 4 and on["qa"]["new"]["n"] == 1
    assert on["qa_training_templates"]["known"]["em"] == 1.0  # the trained facts
    assert on["usage"]["blocks"]["1"]["accesses"] == 48 * trained.memory_config.heads * trained.memory_config.knn
    assert on["nll"]["tokens"] == 4 * 15
    assert on["nll"]["nll"] == pytest.approx(heldout_nll(trained, heldout_rows)["nll"])

    # memory off: the numbers are measured again and they change (the memory replaces the FFN of block 1)
    assert off["nll"]["nll"] != pytest.approx(on["nll"]["nll"])
    predictions = lambda block: [r["prediction"] for rows in block["rows"].values() for r in rows]  # noqa: E731
    assert predictions(off) != predictions(on)
    with trained.memory_off():
        assert off["nll"]["nll"] == pytest.approx(heldout_nll(trained, heldout_rows)["nll"])

    d = result["derived"]
    em_on, em_off = on["qa_training_templates"]["known"]["em"], off["qa_training_templates"]["known"]["em"]
    assert d["known_training_em_drop"] == pytest.approx((em_on - em_off) / em_on)
    em_on, em_off = on["qa"]["known"]["em"], off["qa"]["known"]["em"]
    assert d["known_em_drop"] == (None if em_on == 0 else pytest.approx((em_on - em_off) / em_on))
    assert d["nll_rise"] == pytest.approx((off["nll"]["nll"] - on["nll"]["nll"]) / on["nll"]["nll"])

    report = format_report(result)
    assert "known (train tmpl)" in report and "new" in report and "block 1" in report
    assert "1.000" in report


def test_evaluate_model_without_memory_off_or_rows(tokenizer):
    model = micro(tokenizer)
    result = evaluate_model(model, facts={"bio_only": FACTS[:1]}, heldout_rows=None, usage_rows=None, with_memory_off=False)
    json.dumps(result, allow_nan=False)
    assert result["memory_off"] is None and result["memory_on"]["nll"] is None and result["memory_on"]["usage"] is None
    assert result["memory_on"]["qa_training_templates"] == {}
    assert result["derived"]["known_em_drop"] is None and result["derived"]["nll_rise"] is None
    assert "bio_only" in format_report(result)
